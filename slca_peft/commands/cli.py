"""`slca-peft` command line: train, export, push, info, convert, report."""

from __future__ import annotations

import argparse
import json
import sys


def _export(ns: argparse.Namespace) -> None:
    from ..continual.checkpoint import load_checkpoint
    from ..continual.run_dir import task_checkpoint
    from ..export.classifier import check_export_target, export_model

    ns.checkpoint = task_checkpoint(ns.checkpoint, "export")  # a run directory stands for its last task
    check_export_target(ns.output_dir, overwrite=ns.overwrite)  # before the checkpoint is loaded
    model, _, state, _ = load_checkpoint(ns.checkpoint, ns.revision)
    export_model(model, ns.output_dir, card={"state": state}, overwrite=ns.overwrite)  # its names and results
    print(f"exported {ns.checkpoint} -> {ns.output_dir} ({model.classifier.num_classes} classes, output k = class "
          f"id k); upload it with: slca-peft push {ns.output_dir} <repo_id>")


def _push(ns: argparse.Namespace) -> None:
    from ..continual.checkpoint import load_checkpoint
    from ..data.transforms import default_image_processor
    from ..sharing.hub import check_export, is_export, push_folder

    # Refuse to upload a checkpoint or an export that does not load.
    processor = None
    if is_export(ns.checkpoint):
        check_export(ns.checkpoint)
    else:
        # A checkpoint whose manifest lists no processor (saved before slca-peft listed the run's) gets, in the
        # uploaded copy, the one its model loads with (a processor file beside it), else the one slca-peft
        # evaluates it with; a listed one is uploaded as it is.
        model = load_checkpoint(ns.checkpoint).model
        processor = model.image_processor or default_image_processor(model)
    message = ns.commit_message or ("Upload exported SLCA++ model" if is_export(ns.checkpoint)
                                    else "Upload SLCA++ continual checkpoint")
    print(push_folder(ns.checkpoint, ns.repo_id, private=ns.private, commit_message=message,
                      base_model_id=ns.base_model_id, revision=ns.revision, create_pr=ns.create_pr, tags=ns.tags,
                      token=ns.token, image_processor=processor))


def _info(ns: argparse.Namespace) -> None:
    from ..continual.checkpoint import load_checkpoint
    from ..continual.run_dir import task_checkpoint

    model, stats, state, _ = load_checkpoint(task_checkpoint(ns.checkpoint, "info"), ns.revision)
    print(json.dumps({
        "base_model": model.slca_config.base_model_name_or_path,
        "task_sizes": model.classifier.task_sizes,
        "classes_with_statistics": len(stats.classes) if stats else 0,
        "accuracy_matrix": (state or {}).get("accuracy_matrix"),
    }, indent=2))


def _convert(ns: argparse.Namespace) -> None:
    from ..models.convert import convert_checkpoint

    out = convert_checkpoint(ns.input, ns.output_dir, num_attention_heads=ns.num_attention_heads,
                             layer_norm_eps=ns.layer_norm_eps)
    print(f"converted {ns.input} -> {out} (transformers ViTModel, safetensors)")


def _report(ns: argparse.Namespace) -> None:
    from ..sharing.report import write_report

    for path in write_report(ns.output_dir):
        print(path)


def version_line() -> str:
    """`slca-peft X (transformers Y, peft Z, torch W)`: the installed distributions' versions."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    libraries = ", ".join(f"{name} {installed(name)}" for name in ("transformers", "peft", "torch"))
    return f"slca-peft {installed('slca-peft')} ({libraries})"


def main(argv: list[str] | None = None) -> None:
    """The `slca-peft` command; from the command line (`argv=None`) a user error is one line on stderr
    (`--debug` or SLCA_PEFT_DEBUG=1 for the traceback)."""
    if argv is None:
        from ..utils.errors import run_main

        run_main(main, sys.argv[1:])
        return
    if argv[:1] == ["train"]:
        # The recipe owns the training arguments (HfArgumentParser over SLCAConfig).
        from .recipe import main as train_main

        train_main(argv[1:], prog="slca-peft train")
        return
    parser = argparse.ArgumentParser(prog="slca-peft", description=__doc__)
    parser.add_argument("--version", action="version", version=version_line())
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("train", help="train over a task sequence (the recipe; `slca-peft train --help` lists its flags, "
                   "`slca-peft train FILE.yaml` or `--config FILE` reads them from a file)")
    p = sub.add_parser("export", help="write a plain transformers checkpoint for pipeline()")
    p.add_argument("checkpoint")
    p.add_argument("output_dir")
    p.add_argument("--revision")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a previous export in output_dir (its files only; anything else there is refused)")
    p.set_defaults(func=_export)
    p = sub.add_parser("push", help="upload a checkpoint or an export directory to the Hub as one commit")
    p.add_argument("checkpoint", help="a task checkpoint, or a directory `slca-peft export` wrote")
    p.add_argument("repo_id")
    p.add_argument("--private", action="store_true")
    p.add_argument("--commit_message", default=None)
    p.add_argument("--base_model_id", help="Hub id of the base model, for a checkpoint trained on a local copy")
    p.add_argument("--revision", help="branch to commit to, created if missing (default: main)")
    p.add_argument("--create_pr", action="store_true", help="open a pull request instead of committing")
    p.add_argument("--tags", nargs="*", default=None, help="extra model card tags")
    p.add_argument("--token", default=None,
                   help="Hub token with write access (default: the saved login or the HF_TOKEN variable)")
    p.set_defaults(func=_push)
    p = sub.add_parser("info", help="print what a checkpoint holds")
    p.add_argument("checkpoint")
    p.add_argument("--revision")
    p.set_defaults(func=_info)
    p = sub.add_parser("convert", help="timm / MoCo v3 ViT checkpoint (.pth) -> transformers ViTModel directory")
    p.add_argument("input", help="checkpoint file, read with torch.load(weights_only=True)")
    p.add_argument("output_dir")
    p.add_argument("--num_attention_heads", type=int, default=None, help="default: hidden size // 64")
    p.add_argument("--layer_norm_eps", type=float, default=1e-6, help="timm's ViT uses 1e-6")
    p.set_defaults(func=_convert)
    p = sub.add_parser("report", help="plots and a results table from a finished run's metrics.json / seeds.json")
    p.add_argument("output_dir")
    p.set_defaults(func=_report)
    ns = parser.parse_args(argv)
    ns.func(ns)


if __name__ == "__main__":
    main()
