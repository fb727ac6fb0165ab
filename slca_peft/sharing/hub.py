"""Hub uploads of slca-peft model folders and continual checkpoints (the cards: `slca_peft.sharing.card`)."""

from __future__ import annotations

import contextlib
import importlib
import logging
import tempfile
from pathlib import Path
from typing import Any

from ..artifacts.atomic import write_image_processor, write_json
from ..artifacts.layout import (
    ADAPTER_CONFIG_FILE,
    AUTO_CONFIG_FILE,
    BACKBONE_CONFIG_FILE,
    CARD_FILE,
    CONFIG_FILE,
    EXPORT_CONFIG_FILE,
    EXPORT_INDEX_FILE,
    EXPORT_WEIGHTS_FILE,
    MANIFEST_FILE,
    PROCESSOR_FILE,
    STATE_FILE,
    STATISTICS_FILE,
    folder_kind,
)
from ..artifacts.manifest import copy_verified, read_manifest, read_manifest_extra, record_tree
from ..artifacts.task_history import read_state
from ..utils.errors import UserError
from ..utils.reading import open_regular, read_json, read_text
from .card import LOCAL_BASE_PLACEHOLDER, REPO_PLACEHOLDER, local_base_note, write_model_card
from .public import base_display, is_local_name, public_name, public_state

logger = logging.getLogger(__name__)


def _upload_errors() -> tuple[type[BaseException], ...]:
    """What an upload can meet that is not a bug of slca-peft: the network and the Hub (OSErrors, and the
    HTTP client's own errors, which huggingface_hub lets through for a broken connection) and a folder the
    user can fix (`UserError`). Anything else is a bug and keeps its traceback."""
    errors: list[type[BaseException]] = [OSError, UserError]
    for module, name in (("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests", "RequestException")):
        with contextlib.suppress(ImportError):
            errors.append(getattr(importlib.import_module(module), name))
    return tuple(errors)


#: The errors after which a run's upload is logged and training goes on (`PushStep`, `SLCATrainer` saves).
UPLOAD_ERRORS = _upload_errors()


def local_base_problem(base: str | None, use_lora: bool, base_model_id: str | None) -> str | None:
    """Why an upload of a checkpoint on `base` could not be loaded elsewhere, or None if it can."""
    if base_model_id is not None or not use_lora or not base or not is_local_name(str(base)):
        return None
    return (
        f"its base model is the local path {base!r}, which nobody who downloads the repo can load. "
        "Upload the base model first (e.g. ViTModel.from_pretrained(path).push_to_hub('me/base')) and pass its "
        "Hub id as base_model_id (`slca-peft push ... --base_model_id me/base`, or `--hub_base_model_id` when "
        "training with --push_to_hub)."
    )


def check_pushable(settings: dict[str, Any], base_model_id: str | None, prefix: str) -> None:
    """Refuse, before anything is uploaded (or trained, when every task is pushed), an upload whose base
    model is a local directory that nobody who downloads the repo can load; `settings` are the model's
    (`slca_config.json`); the message starts with `prefix`."""
    problem = local_base_problem(settings.get("base_model_name_or_path"), bool(settings.get("use_lora")),
                                 base_model_id)
    if problem:
        raise UserError(f"{prefix}{problem}")


def check_repo_id(repo_id: str, fix: str = "give another repo id, e.g. me/my-model") -> str:
    """Refuse, before anything is trained or uploaded, a repo id the Hub would refuse (huggingface_hub's own
    rules: `name` or `namespace/name` of letters, digits, `-`, `_`, `.`)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise UserError(f"{repo_id!r} is not a valid Hub repo id ({' '.join(str(err).split())[:160]}); {fix}.") from err
    return repo_id


def default_repo_id(args: Any) -> str:
    """Where a run's or a trainer's uploads go: `hub_model_id`, else the output directory's name (as
    `Trainer.init_hf_repo` names it)."""
    return args.hub_model_id or Path(args.output_dir).absolute().name


def check_run_repo_id(args: Any) -> str:
    """`default_repo_id(args)`, refused when the Hub would refuse it: what a run that pushes checks before any
    training (an output directory named `runs/cifar100_slca++` is no repo id)."""
    if args.hub_model_id:
        return check_repo_id(args.hub_model_id, "give --hub_model_id a valid one, e.g. me/my-model")
    name = default_repo_id(args)
    return check_repo_id(name, "it is the output directory's name; give --hub_model_id, e.g. me/my-model")


def is_export(directory: str | Path) -> bool:
    """A folder `export` wrote (a stock transformers model), not an slca-peft checkpoint."""
    return folder_kind(directory) == "export"


def check_export(directory: str | Path) -> None:
    """Refuse, naming what is missing, an export folder `pipeline()` could not load."""
    directory = Path(directory)
    config = read_json(directory / EXPORT_CONFIG_FILE)
    missing = [name for name in (PROCESSOR_FILE, CARD_FILE) if not (directory / name).is_file()]
    if not any((directory / name).is_file() for name in (EXPORT_WEIGHTS_FILE, EXPORT_INDEX_FILE)):
        missing.append(EXPORT_WEIGHTS_FILE)
    if not isinstance(config, dict) or not config.get("architectures") or not config.get("id2label") or missing:
        raise UserError(f"{directory} is not a complete export (missing {missing or ['config.json fields']}); "
                         "write it again with `slca-peft export CHECKPOINT DIR`.")


def _prepare_upload(directory: Path, repo_id: str, base_model_id: str | None, tags: list[str] | None) -> None:
    """Make an upload copy name `base_model_id` as its base model in every file that records it (a local
    base of a full fine-tuning, whose weights travel with it, by its folder name), its task history name
    no path of this machine (`public_state`), and its card point at the repo."""
    settings: dict[str, Any] = {}
    local_base = None
    for name in (CONFIG_FILE, ADAPTER_CONFIG_FILE):
        path = directory / name
        if path.is_file():
            data = read_json(path)
            base = data.get("base_model_name_or_path")
            public = base_model_id if base_model_id is not None else public_name(base)
            if public != base:
                local_base = local_base or base
                data["base_model_name_or_path"] = public
            if name == ADAPTER_CONFIG_FILE and (directory / AUTO_CONFIG_FILE).is_file():
                # transformers' Auto classes and pipeline() given a repo id that holds an adapter load the base
                # this names with a random head; naming the repo sends them to its config.json (the trained
                # model, `slca_peft.models.auto`). slca_config.json and the card keep naming the base model.
                data["base_model_name_or_path"] = repo_id
            if data.get("base_model_name_or_path") != base:
                write_json(path, data)
            settings = data if name == CONFIG_FILE else settings
    backbone_config = directory / BACKBONE_CONFIG_FILE
    if backbone_config.is_file():  # a full fine-tuning's backbone config records where the base was loaded from
        data = read_json(backbone_config)
        if data.get("_name_or_path") != public_name(data.get("_name_or_path")):
            write_json(backbone_config, {**data, "_name_or_path": base_model_id or public_name(data["_name_or_path"])})
    state = read_state(directory)
    if state is not None:
        write_json(directory / STATE_FILE, public_state(state))
    card_path = directory / CARD_FILE
    if not card_path.is_file():
        write_model_card(directory, settings, state, continuable=state is not None
                         and (directory / STATISTICS_FILE).is_file())
    from huggingface_hub import ModelCard

    card = ModelCard(read_text(card_path, MAX_CARD_BYTES, fix=_CARD_FIX))  # ModelCard.load reads it whole
    if base_model_id is not None:
        card.data.base_model = base_model_id
    if local_base:
        new = base_model_id or public_name(local_base)
        if base_model_id is not None:  # the card's PEFT snippet loads the base by its Hub id now
            card.text = card.text.replace(local_base_note(base_display(local_base)), "").replace(
                f'"{LOCAL_BASE_PLACEHOLDER}"', f'"{base_model_id}"')
        card.text = card.text.replace(base_display(local_base), new).replace(str(local_base), new)
    card.data.tags = list(dict.fromkeys([*(card.data.tags or []), *(tags or [])]))
    card.text = card.text.replace(REPO_PLACEHOLDER, repo_id)
    card.save(card_path)


#: Largest model card read or uploaded (a card is a few kilobytes; a long one with tables, a few hundred).
MAX_CARD_BYTES = 4 << 20
_CARD_FIX = "a model card is text of at most 4 MiB: shorten it or write it again"


def _check_card(directory: Path) -> None:
    """Refuse, before anything is copied, a model card that is not a regular file of bounded size."""
    try:
        with open_regular(directory / CARD_FILE, MAX_CARD_BYTES, fix=_CARD_FIX):
            pass
    except FileNotFoundError:
        pass


def _copy_for_upload(directory: Path, folder: Path) -> dict:
    """Copy what an upload of `directory` may send: the files its manifest lists, each a regular file
    with one link, reached without a symlink, whose SHA-256 still matches the record (the model card
    excepted: the user may edit it), hashed as it is copied (`manifest.copy_verified`). Nothing else
    goes: a file put beside them, a symlink or its target, a hard link to a token. Returns the
    manifest's other fields. A folder without a manifest is refused."""
    entries = read_manifest(directory)
    if entries is None:
        raise UserError(f"{directory} has no {MANIFEST_FILE}, so slca-peft cannot tell which of its files it wrote "
                        "and uploads none of them; push a checkpoint or model folder slca-peft wrote (save_checkpoint, "
                        "save_pretrained), or write a stock model with `slca-peft export CHECKPOINT DIR` and push "
                        "that.")
    _check_card(directory)
    folder.mkdir(parents=True)
    for rel, entry in sorted(entries.items()):
        copy_verified(directory, entry, folder / rel, may_change=rel == CARD_FILE)
    return read_manifest_extra(directory)


def _record_upload(folder: Path, extra: dict) -> None:
    """The upload copy's own manifest, written after `_prepare_upload` edited it (base model id, card), so
    what is pushed is a folder slca-peft can check and push again; a local base model's digests (its
    path names a folder nobody who downloads the repo has) are dropped."""
    record_tree(folder, {k: v for k, v in extra.items() if k != "base_model"})


def push_folder(
    directory: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    commit_message: str = "Upload SLCA++ continual checkpoint",
    commit_description: str | None = None,
    token: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    tags: list[str] | None = None,
    base_model_id: str | None = None,
    image_processor: Any | None = None,
) -> Any:
    """Create the repo (and the `revision` branch) if needed and upload a model folder or checkpoint
    as one commit, or as one pull request with `create_pr`. Only the files slca-peft wrote there (its
    manifest), unchanged, are sent (`_copy_for_upload`): never a symlink's target, a hard link, a file
    put beside them or one edited since (the model card excepted); a folder without a manifest is
    refused. The uploaded copy carries a manifest of its own files as uploaded.

    A LoRA checkpoint refers to its base model by name; one built on a local directory would load
    nowhere else, so it is refused unless `base_model_id` names the same weights on the Hub (the
    uploaded copy then records that id; the local directory is left as it is).

    `image_processor` goes into the uploaded copy when the folder holds none of its own (one written before
    slca-peft saved the run's processor with the model), so `pipeline()` can load the repo.
    """
    from huggingface_hub import HfApi

    directory = Path(directory)
    check_repo_id(repo_id)
    config_path = directory / CONFIG_FILE
    settings = read_json(config_path) if config_path.is_file() else {}
    check_pushable(settings, base_model_id, f"{directory}: ")
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / directory.name
        extra = _copy_for_upload(directory, folder)
        if image_processor is not None and not (folder / PROCESSOR_FILE).is_file():
            write_image_processor(image_processor, folder)
        _prepare_upload(folder, repo_id, base_model_id, tags)
        _record_upload(folder, extra)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision not in (None, "main"):
            # upload_folder refuses a branch that does not exist yet (a pull request targets it too).
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            commit_message=commit_message,
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
            repo_type="model",
        )
