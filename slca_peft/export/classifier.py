"""Export to a plain `AutoModelForImageClassification` checkpoint that needs no slca-peft.

Each backbone's route (which stock head reads the feature the continual heads were trained on) is
in `slca_peft.models.backbones`; backbones with no such head are refused with the reason. The adapter is
merged into the frozen weights, the trained LayerNorms/biases/class token are taken over, and the
per-task heads with their scales are folded into one linear layer:
`head_j(s_j * f) = (s_j W_j) f + b_j`. The folded rows are then put in class-id order by the mapping
`SLCAModel.forward` puts its logits through (`slca_peft.models.head.by_class_id`), so output k is the
class the dataset labels k (`SLCAModel.class_ids`; the identity for checkpoints written before class
ids were recorded), the export's logits are the model's, and `config.id2label` is the model's.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import shutil
import stat
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from peft import PeftModel
from transformers import AutoModelForImageClassification
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

from ..artifacts import manifest
from ..artifacts.atomic import (
    atomic_directory,
    follow_umask,
    partial_sibling,
    recover_replaced,
    settle_files,
    swap_directories,
    sweep_partial,
    unmark_partial,
)
from ..artifacts.layout import CARD_FILE, folder_kind
from ..data.transforms import default_image_processor
from ..models.backbones import CLS_MEAN_HEAD, POOLER_HEAD, TIMM_HEAD
from ..models.head import by_class_id
from ..sharing.card import build_export_card
from ..utils.errors import UserError
from .lock import export_lock

if TYPE_CHECKING:
    from ..models.model import SLCAModel

def folded_head(model: SLCAModel) -> tuple[torch.Tensor, torch.Tensor]:
    """One weight and bias equal to the concatenated, scaled task heads, with row k the class id k
    (`slca_peft.models.head.by_class_id`, the mapping `SLCAModel.forward` puts its logits through): ids
    below the largest that no output has (classes not learned yet, mid-stream) get zero weight and the
    dtype's lowest bias, so they never win an argmax and get no probability."""
    weight, bias = (t.detach() for t in model.classifier.fused_weight_and_bias())
    ids = model.class_ids
    return by_class_id(weight, ids, fill=0.0), by_class_id(bias, ids)


def export_route(model: SLCAModel) -> str:
    """The backbone table's export route for `model`, or one error saying why there is none (raised
    before any work: a stock head reading another feature would silently change every prediction)."""
    spec = model.backbone_spec
    if spec.export_route is None:
        raise UserError(
            f"export: a {spec.model_type} backbone cannot become a stock *ForImageClassification model: "
            f"{spec.export_refusal}. Keep it as an slca-peft checkpoint (save_pretrained / from_pretrained)."
        )
    return spec.export_route


def merged_backbone(model: SLCAModel) -> torch.nn.Module:
    """A copy of the backbone with the adapter merged into its weights (PEFT's merge_and_unload)."""
    backbone = copy.deepcopy(model.backbone)
    if not isinstance(backbone, PeftModel):
        return backbone
    method = getattr(backbone.peft_config["default"].peft_type, "value", "LoRA")
    try:
        return backbone.merge_and_unload()
    except (NotImplementedError, ValueError, TypeError, AttributeError) as err:
        raise UserError(
            f"export: PEFT cannot merge this {method} adapter into the backbone ({err}); a stock model has no "
            "place for unmerged adapter weights. Keep it as an slca-peft checkpoint, or train with a method PEFT "
            "merges (LoRA, DoRA, LoHa, LoKr, IA3)."
        ) from err


def _classifier_config(model: SLCAModel, names: list[str]):
    config = copy.deepcopy(model.config)
    config.num_labels = len(names)
    config.id2label = dict(enumerate(names))
    config.label2id = {name: i for i, name in enumerate(names)}
    for timm_field, value in (("label_names", list(names)), ("num_classes", len(names))):
        if hasattr(config, timm_field):  # TimmWrapperConfig writes these instead of id2label
            setattr(config, timm_field, value)
    # The plain *ForImageClassification (DeiT also maps to a distillation variant reading two tokens).
    stock = MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES[config.model_type]
    config.architectures = [stock if isinstance(stock, str) else stock[0]]
    return config


def _load_backbone(classifier, backbone: torch.nn.Module, route: str) -> None:
    """Copy the merged backbone's weights into the stock model's backbone, refusing any mismatch."""
    state = backbone.state_dict()
    if route == TIMM_HEAD:  # both hold the timm module as `timm_model`; only timm's head is new
        missing, unexpected = classifier.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("timm_model.head.")]
    else:
        target = getattr(classifier, classifier.base_model_prefix)
        missing, unexpected = target.load_state_dict(state, strict=False)
        if route != POOLER_HEAD:  # ViT/DeiT keep no pooler; BEiT and Swin read theirs
            missing = [k for k in missing if not k.startswith("pooler.")]
    if missing or unexpected:
        raise RuntimeError(f"backbone weights do not fit the exported model: missing {missing}, "
                           f"unexpected {unexpected}.")


def export_model(
    model: SLCAModel, directory: str | Path, label_names: list[str] | None = None, image_processor=None,
    card: dict | None = None, *, overwrite: bool = False,
) -> Path:
    """Write `directory` for `pipeline("image-classification", model=directory)`: output k is class id
    k. `label_names` (in class-id order, at least one per output: a dataset's `features["label"].names`
    will do) default to the model's `id2label`; `card` (`source`, `task`, `state`: the task history whose
    results the card reports, `license`, `datasets`, `tags`, `model_name`: the folder's name unless given)
    feeds the export's model card.

    The target must be new, empty, or (with `overwrite`) a previous export, whose files alone are
    replaced (`check_export_target`)."""
    with export_lock(directory):
        return _export_locked(model, directory, label_names, image_processor, card, overwrite=overwrite)


def _export_locked(model: SLCAModel, directory: str | Path, label_names, image_processor, card, *,
                   overwrite: bool) -> Path:
    previous = check_export_target(directory, overwrite=overwrite)
    route = export_route(model)
    weight, bias = folded_head(model)
    missing = sorted(set(range(model.num_outputs)) - set(model.class_ids))
    if missing:
        logging.getLogger(__name__).warning(
            "export: class id(s) %s have not been learned yet; their outputs never win (zero weight, lowest "
            "bias). Export the last task's checkpoint for a model of every class.", missing[:10],
        )
    num_outputs = weight.shape[0]
    if label_names is None:
        names = list(model.id2label.values())
    else:  # a dataset's whole class list is fine: the ids past the last output are not learned yet
        names = list(label_names)[:num_outputs]
    if len(names) != num_outputs:
        raise UserError(f"{len(names)} label names for {num_outputs} outputs; pass one name per class id "
                         f"0..{num_outputs - 1} (at least), in class-id order.")
    config = _classifier_config(model, names)
    eps = model.slca_config.final_norm_eps
    if model.slca_config.reset_final_norm and getattr(config, "layer_norm_eps", eps) != eps:
        # One eps serves every LayerNorm of a transformers ViT: the fresh final norm's cannot be kept.
        logging.getLogger(__name__).warning(
            "the final LayerNorm uses eps %g but the exported %s config has layer_norm_eps %g for every norm; "
            "exported logits differ from the model's by a tiny amount.",
            eps, config.model_type, config.layer_norm_eps,
        )
    backbone = merged_backbone(model)
    classifier = AutoModelForImageClassification.from_config(config)
    _load_backbone(classifier, backbone, route)
    head = classifier.timm_model.get_classifier() if route == TIMM_HEAD else classifier.classifier
    with torch.no_grad():
        if route == CLS_MEAN_HEAD:
            # DINOv2's head reads [class token, mean patch token]: the patch half gets zero weight.
            head.weight.zero_()
            head.weight[:, : weight.shape[1]].copy_(weight)
        else:
            head.weight.copy_(weight)
        head.bias.copy_(bias)
    # The run's own processor (saved with the model, loaded with it), else the one slca-peft evaluates with.
    processor = image_processor or model.image_processor or default_image_processor(model)
    card = dict(card or {})
    # Named after the export's folder (what `slca-peft push` uploads, usually under the same name), tagged with
    # its architecture: a plain classifier, not the continual checkpoint it came from.
    card.setdefault("model_name", Path(directory).resolve().name)
    card["tags"] = [config.model_type, *card.get("tags", [])]
    readme = build_export_card(
        model.slca_config.base_model_name_or_path, dict(enumerate(names)),
        card.pop("state", None), architecture=config.architectures[0],
        source=card.pop("source", getattr(model, "name_or_path", None)), **card,
    )
    _write_export(Path(directory), previous, classifier, processor, readme)
    return Path(directory)


#: The manifest `kind` of an export folder (what `--overwrite` may replace).
EXPORT_KIND = "export"
#: What marks a folder as slca-peft's own: a checkpoint or model folder, or a run directory.
def check_export_target(directory: str | Path, *, overwrite: bool = False) -> bool:
    """Refuse an export target that would delete what is not the export's; returns whether it holds a
    previous export (to be replaced, with `overwrite`).

    Refused: a target that is, or lies inside, a checkpoint or a run directory (`export ck ck`,
    `export run/task_2 run`); a symbolic link; a non-empty folder that is not a previous export (a
    user's folder); a previous export without `overwrite`; with it, a previous export whose manifest is
    invalid or lists a path under a symlinked sub-folder, or that holds a FIFO, device or socket.
    """
    target = Path(directory)
    recover_replaced(target)  # a replacement killed between its two renames (where names cannot be exchanged)
    if target.is_symlink():
        raise UserError(f"export: {target} is a symbolic link; give the export a real, new directory.")
    if target.exists() and not target.is_dir():
        raise UserError(f"export: {target} is a file; give the export a new or empty directory.")
    real = Path(os.path.realpath(target))
    for folder in (real, *real.parents):
        kind = folder_kind(folder)
        kind = None if kind == "export" else kind
        if kind:
            where = "is" if folder == real else f"lies inside {folder}, which is"
            raise UserError(f"export: {target} {where} a {kind}; writing the export there would delete or mix with "
                            "its files: give the export a directory of its own.")
    if not target.is_dir() or not any(target.iterdir()):
        return False
    if manifest.read_manifest_extra(target).get("kind") != EXPORT_KIND:
        names = sorted(p.name for p in target.iterdir())
        more = f" and {len(names) - 5} more" if len(names) > 5 else ""
        raise UserError(f"export: {target} is not empty ({', '.join(names[:5])}{more}) and holds no previous export; "
                        "give the export a new or empty directory.")
    if not overwrite:
        raise UserError(f"export: {target} holds a previous export; pass --overwrite (overwrite=True) to replace its "
                        "files, or give another directory.")
    _replacement(target)  # every refusal before any work
    return True


def _replacement(target: Path) -> tuple[manifest.RemovalPlan, list[str]]:
    """(the previous export's own files, checked against its manifest; everything else in `target`, by
    relative path: files and links put there, files edited since, empty folders), refused before
    anything is written when the manifest is invalid or something there cannot be carried over."""
    plan = manifest.plan_removal(target)
    ours = set(plan.remove) | {manifest.MANIFEST_FILE}
    theirs = []
    for folder, dirs, files in os.walk(target):
        here = Path(folder)
        for name in sorted(dirs):
            path = here / name
            if path.is_symlink():
                theirs.append(path.relative_to(target).as_posix())
            elif not any(path.iterdir()):
                theirs.append(path.relative_to(target).as_posix())
        dirs[:] = sorted(d for d in dirs if not (here / d).is_symlink())
        for name in sorted(files):
            path = here / name
            rel = path.relative_to(target).as_posix()
            if rel in ours:
                continue
            mode = os.lstat(path).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
                raise UserError(f"export: {path} is not a regular file or link (a FIFO, device or socket) and not the "
                                "previous export's; move it out of the folder, then export again.")
            theirs.append(rel)
    return plan, theirs


def _carry_over(target: Path, tmp: Path, theirs: list[str]) -> None:
    """Give the new export (`tmp`) the user's files from `target` under their own paths (hard links,
    else copies, so the files stay in `target` too until the swap); a name the new export writes is
    refused first, before anything is carried."""
    for rel in theirs:
        parts = Path(rel).parts
        for depth in range(1, len(parts) + 1):
            there = tmp.joinpath(*parts[:depth])
            if os.path.lexists(there) and (depth == len(parts) or not there.is_dir() or there.is_symlink()):
                raise UserError(f"export: {target / rel} is not the previous export's (a file put there or edited "
                                f"since) and the new export writes {Path(*parts[:depth]).as_posix()}: move it out of "
                                "the folder, then export again; nothing was changed.")
    for rel in theirs:
        source, copy = target / rel, tmp / rel
        copy.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            os.symlink(os.readlink(source), copy)
        elif source.is_dir():
            copy.mkdir(exist_ok=True)
        else:
            try:
                os.link(source, copy, follow_symlinks=False)
            except OSError:
                shutil.copy2(source, copy, follow_symlinks=False)


def _drop_previous(old: Path, target: Path, plan: manifest.RemovalPlan, theirs: list[str]) -> None:
    """Delete the previous export, now at `old`: the second names of the user's files (each checked to be
    in the new export first), then its own files (`manifest.carry_out`, those its manifest lists and
    `_replacement` found unchanged). Anything left is kept under a visible name and said."""
    for rel in sorted(theirs, key=lambda r: len(Path(r).parts), reverse=True):
        leftover, kept = old / rel, target / rel
        if not os.path.lexists(kept):
            continue
        if leftover.is_dir() and not leftover.is_symlink():
            with contextlib.suppress(OSError):
                leftover.rmdir()
        elif leftover.is_symlink() or os.path.samefile(leftover, kept) or \
                manifest.file_sha256(leftover) == manifest.file_sha256(kept):
            leftover.unlink()
    manifest.carry_out(manifest.RemovalPlan(old, plan.remove, [], plan.manifest))
    unmark_partial(old)
    for folder, _, _ in sorted(os.walk(old), key=lambda entry: len(entry[0]), reverse=True):
        with contextlib.suppress(OSError):  # the user's sub-folders, carried over, leave empty ones behind
            os.rmdir(folder)
    if os.path.lexists(old):
        visible = target.parent / f"{target.name}.previous-{os.getpid()}"
        os.replace(old, visible)
        logging.getLogger(__name__).warning("export: kept %s: it holds files of the previous export's folder that "
                                            "could not be carried over; look through it and delete it.", visible)


def _write_export(target: Path, previous: bool, classifier, processor, readme) -> None:
    """Write the export through a temporary sibling and put it in place in one step: a previous export
    is replaced by swapping the two folders (old or new after a kill, never half of each), with the
    files it holds that it did not write (or that were edited since) carried over, then its own files
    deleted."""
    if not previous:
        with atomic_directory(target) as tmp:
            classifier.save_pretrained(tmp)
            processor.save_pretrained(tmp)
            readme.save(Path(tmp) / CARD_FILE)
            manifest.record_tree(tmp, {"kind": EXPORT_KIND})
        return
    # Left by a kill: the new export before its swap, or the old one after it, each holding only second names
    # (hard links or copies) of the files carried over, which are in `target`; a folder slca-peft did not mark
    # (a user's, named alike) stays.
    sweep_partial(target)
    tmp = partial_sibling(target)
    try:
        follow_umask(tmp, directory=True)
        classifier.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        readme.save(tmp / CARD_FILE)
        settle_files(tmp)
        manifest.record_tree(tmp, {"kind": EXPORT_KIND})  # the new export's files only
        plan, theirs = _replacement(target)
        _carry_over(target, tmp, theirs)
        old = swap_directories(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # the new export, and second names of files still in `target`
        raise
    plan.say_kept("export: ")
    _drop_previous(old, target, plan, theirs)
