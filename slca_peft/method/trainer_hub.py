"""`SLCATrainer`'s Hub methods: the same path as `SLCAModel.push_to_hub` and `slca-peft push` (the one door,
`slca_peft.sharing.hub.push_folder`).

`Trainer.push_to_hub` would upload `output_dir` as it is (with Trainer's generic "trained from scratch"
card, a pickled `training_args.bin` on checkpoint pushes, and a local base model that nobody who
downloads the repo can load). Here every upload, explicit or at a save with `push_to_hub=True`, is one
commit with the library's card, a local base model refused as `slca-peft push` refuses it: the model files
(`SLCAModel.push_to_hub`) while training, the continual checkpoint output_dir holds once training ended
(`push_folder`, the files its manifest lists), which `--continue_from REPO` goes on from.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from transformers.trainer_utils import HubStrategy, SaveStrategy

from ..artifacts.atomic import atomic_write_text
from ..artifacts.layout import CARD_FILE, STATISTICS_FILE
from ..models.saving import card_backbone
from ..sharing.card import build_model_card
from ..sharing.hub import UPLOAD_ERRORS, check_run_repo_id, default_repo_id, local_base_problem, push_folder
from ..sharing.public import is_local_name
from ..utils.errors import UserError
from ..utils.logging import RepeatedWarning

logger = logging.getLogger(__name__)

#: `Trainer.create_model_card`'s keywords, which `push_to_hub` passes on to it.
_CARD_KEYWORDS = ("language", "license", "tags", "model_name", "finetuned_from", "tasks", "dataset_tags", "dataset",
                  "dataset_args")


def _as_list(value: str | list[str] | None) -> list[str]:
    return [value] if isinstance(value, str) else list(value or [])


class TrainerHub:
    """The Hub methods of `SLCATrainer` (a mixin before `Trainer` in its bases)."""

    def hub_repo_id(self) -> str:
        """`hub_model_id`, or the output directory's name (as `Trainer.init_hf_repo` and `PushStep`)."""
        return default_repo_id(self.args)

    def check_pushable(self) -> None:
        """Refuse, as `slca-peft push` does, an upload whose base model is a local directory (unless
        `hub_base_model_id` names it on the Hub), naming the fix the caller's own arguments accept: a
        plain `TrainingArguments` (transformers' example scripts) has no `hub_base_model_id`."""
        model = self.slca_model
        base = model.settings()["base_model_name_or_path"]
        problem = local_base_problem(base, model.slca_config.use_lora, self.args.hub_base_model_id)
        if not problem:
            return
        if getattr(self, "_plain_training_arguments", False):
            raise UserError(
                f"push_to_hub: the base model is the local path {base!r}, which nobody who downloads the repo can "
                "load. Upload the base model first (e.g. ViTModel.from_pretrained(path).push_to_hub('me/base')) and "
                "train from its Hub id (--model_name_or_path me/base), or give SLCATrainer "
                "args=SLCAConfig(..., hub_base_model_id='me/base')."
            )
        raise UserError(f"push_to_hub: {problem}")

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        """With `push_to_hub=True`: refuse an unloadable upload before training; the repo itself is created
        by the first upload (one commit, `SLCAModel.push_to_hub`)."""
        if self.model is not None:
            self.check_pushable()
        self.hub_model_id = check_run_repo_id(self.args)
        self.push_in_progress = None

    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
    ) -> None:
        """`output_dir/README.md`: the library's card of the model (`slca_peft.sharing.card`: base model,
        classes by class id, the run's results), not Trainer's generic one, with `Trainer.create_model_card`'s
        keywords on it: `language`, `license`, `tags` and `tasks` (as tags), `model_name`, `finetuned_from`
        (the card's base model when it is a Hub id), `dataset` / `dataset_tags` (the datasets' Hub ids) and
        `dataset_args` (their configurations)."""
        if not self.is_world_process_zero():
            return
        fields = self._card_fields(license, tags, model_name, dataset_tags, dataset, language=language,
                                   finetuned_from=finetuned_from, tasks=tasks, dataset_args=dataset_args)
        card = build_model_card(self._card_settings(fields), self.card_state(), continuable=self.holds_checkpoint(),
                                backbone=card_backbone(self.slca_model), **fields)
        os.makedirs(self.args.output_dir, exist_ok=True)
        atomic_write_text(os.path.join(self.args.output_dir, CARD_FILE), str(card))

    def holds_checkpoint(self) -> bool:
        """Whether output_dir holds this run's continual checkpoint (statistics gathered, then saved)."""
        return self.class_statistics is not None and os.path.isfile(
            os.path.join(self.args.output_dir, STATISTICS_FILE))

    def card_state(self) -> dict[str, Any] | None:
        """The results the card shows: the run's task history (`task_history`: one task of the model's
        classes scored by its evaluation, the model as it is now, after `load_best_model_at_end`)."""
        if not self.slca_model.classifier.num_tasks:
            return None
        state = self.task_history()
        if len(state["task_sizes"]) != 1 or state["accuracy_matrix"] == [[None]]:
            # `evaluate` scores the classes of a one-task model; several tasks need per-task scores.
            state.update(accuracy_matrix=[], seen_accuracy=[])
        return state

    def _card_settings(self, fields: dict[str, Any]) -> dict[str, Any]:
        """The model's settings as the card shows them: `finetuned_from` (a Hub id) names a local base."""
        settings = dict(self.slca_model.settings())
        finetuned_from = fields.get("card_data", {}).get("finetuned_from")
        base = settings.get("base_model_name_or_path")
        if finetuned_from and not is_local_name(finetuned_from) and (base is None or is_local_name(str(base))):
            settings["base_model_name_or_path"] = finetuned_from
        return settings

    def _card_fields(self, license=None, tags=None, model_name=None, dataset_tags=None, dataset=None, *,
                     language=None, finetuned_from=None, tasks=None, dataset_args=None) -> dict[str, Any]:
        datasets = list(dict.fromkeys(_as_list(dataset) + _as_list(dataset_tags)))
        # A local `finetuned_from` (a path of this machine) stays off the card, as the local base model does.
        card_data = {"language": language, "dataset_args": _as_list(dataset_args) or None,
                     "finetuned_from": None if finetuned_from is None or is_local_name(finetuned_from)
                     else finetuned_from}
        return {"license": license, "tags": list(dict.fromkeys(_as_list(tags) + _as_list(tasks))),
                "datasets": datasets or None, "model_name": model_name,  # else the card's own title
                "card_data": {k: v for k, v in card_data.items() if v is not None}}

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        """Save the model to `output_dir` with the library's card and upload it as one commit to `hub_model_id`
        (or the output directory's name): once training ended, the continual checkpoint output_dir holds (the
        files its manifest lists: model, class statistics, task history; `slca-peft push`'s way), before that
        the model files (`SLCAModel.push_to_hub`).
        `kwargs`: `commit_description`, and `create_model_card`'s keywords.
        A local base model is refused unless `hub_base_model_id` names it. The upload is one blocking
        commit (`blocking=False` waits too). Returns the commit's URL on the main process, None on others."""
        self.check_pushable()
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        if not blocking:
            logger.info("push_to_hub: the upload is one blocking commit (blocking=False waits for it too).")
        return self._upload(commit_message or "End of training", token=token, revision=revision, private=private,
                            **kwargs)

    def _upload(self, commit_message: str, *, token: str | None = None, revision: str | None = None,
                private: bool | None = None, commit_description: str | None = None, **card: Any) -> Any:
        unknown = sorted(set(card) - set(_CARD_KEYWORDS))
        if unknown:
            raise TypeError(f"push_to_hub got unexpected keyword(s) {unknown}; it takes commit_message, "
                            f"commit_description, token, revision, private, blocking and {list(_CARD_KEYWORDS)}.")
        self.create_model_card(**card)
        args = self.args
        upload = {"commit_message": commit_message, "commit_description": commit_description,
                  "private": args.hub_private_repo if private is None else private,
                  "token": args.hub_token if token is None else token,
                  "revision": args.hub_revision if revision is None else revision,
                  "base_model_id": args.hub_base_model_id}
        if self.holds_checkpoint():  # the continual checkpoint, with the card just written
            return push_folder(args.output_dir, self.hub_repo_id(), **upload)
        return self.slca_model.push_to_hub(self.hub_repo_id(), card=self._card_fields(**card),
                                           state=self.card_state(), **upload)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """With `push_to_hub=True`, each save during training uploads the model files the way `push_to_hub`
        does (checkpoint-N folders are not uploaded; the class statistics come when training ends). A Hub
        failure is logged, not fatal: training goes on and the files are on disk."""
        if not self.is_world_process_zero() or self.args.hub_strategy == HubStrategy.END:
            return
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        if self.args.save_strategy == SaveStrategy.STEPS:
            message = f"Training in progress, step {self.state.global_step}"
        else:
            message = f"Training in progress, epoch {int(self.state.epoch or 0)}"
        try:
            self._upload(message)
        except UPLOAD_ERRORS as err:  # the Hub or the network (a bug of slca-peft keeps its traceback)
            if getattr(self, "_push_failures", None) is None:  # a Hub that fails at every save warns once per run
                self._push_failures = RepeatedWarning()
            self._push_failures.log(logger, type(err).__name__,
                                    "pushing %s to %s failed (%s); training goes on, the files are in %s.",
                                    Path(checkpoint_folder).name, self.hub_repo_id(), err, self.args.output_dir)
