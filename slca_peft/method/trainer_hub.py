"""`SLCATrainer`'s door to the Hub: the same path as `SLCAModel.push_to_hub` and `slca-peft push`.

`Trainer.push_to_hub` would upload `output_dir` as it is (with Trainer's generic "trained from scratch"
card, a pickled `training_args.bin` on checkpoint pushes, and a local base model that nobody who
downloads the repo can load). Here every upload, explicit or at a save with `push_to_hub=True`, goes
through `SLCAModel.push_to_hub`: one commit of the library's files and card, a continual checkpoint
when the model carries its run state, a local base model refused as `slca-peft push` refuses it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from transformers.trainer_utils import HubStrategy, SaveStrategy

from ..artifacts.atomic import atomic_write_text
from ..artifacts.layout import CARD_FILE
from ..sharing.card import build_model_card
from ..sharing.hub import check_pushable
from ..utils.errors import UserError

logger = logging.getLogger(__name__)

#: `Trainer.create_model_card` keywords the library's card has no place for, and what to do instead.
_UNUSED_CARD_KEYWORDS = {
    "finetuned_from": "the card names the base model the checkpoint references (base_model_id / "
    "hub_base_model_id for a local one)",
    "language": "an image classifier has none",
    "tasks": "the card's task is image classification",
    "dataset_args": "pass the datasets' Hub ids as dataset",
}


def _as_list(value: str | list[str] | None) -> list[str]:
    return [value] if isinstance(value, str) else list(value or [])


class TrainerHub:
    """The Hub methods of `SLCATrainer` (a mixin before `Trainer` in its bases)."""

    def hub_repo_id(self) -> str:
        """`hub_model_id`, or the output directory's name (as `Trainer.init_hf_repo` and `PushStep`)."""
        return self.args.hub_model_id or Path(self.args.output_dir).absolute().name

    def check_pushable(self) -> None:
        """Refuse, as `slca-peft push` does, an upload whose base model is a local directory (unless
        `hub_base_model_id` names it on the Hub)."""
        check_pushable(self.slca_model.settings(), self.args.hub_base_model_id, "push_to_hub: ")

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        """With `push_to_hub=True`: refuse an unloadable upload before training; the repo itself is created
        by the first upload (one commit, `SLCAModel.push_to_hub`)."""
        if self.model is not None:
            self.check_pushable()
        self.hub_model_id = self.hub_repo_id()
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
        classes by class id, the task history's results), not Trainer's generic one. `dataset` and
        `dataset_tags` are the datasets' Hub ids; keywords the card has no place for are refused."""
        given = {"language": language, "finetuned_from": finetuned_from, "tasks": tasks, "dataset_args": dataset_args}
        for name, value in given.items():
            if value is not None:
                raise UserError(f"create_model_card: {name} is not used: {_UNUSED_CARD_KEYWORDS[name]}.")
        if not self.is_world_process_zero():
            return
        model = self.slca_model
        card = build_model_card(model.settings(), None, continuable=False,
                                **self._card_fields(license, tags, model_name, dataset_tags, dataset))
        os.makedirs(self.args.output_dir, exist_ok=True)
        atomic_write_text(os.path.join(self.args.output_dir, CARD_FILE), str(card))

    def _card_fields(self, license=None, tags=None, model_name=None, dataset_tags=None, dataset=None) -> dict[str, Any]:
        datasets = list(dict.fromkeys(_as_list(dataset) + _as_list(dataset_tags)))
        return {"license": license, "tags": _as_list(tags), "datasets": datasets or None,
                "model_name": model_name or self.hub_repo_id().split("/")[-1]}

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        """Save the model to `output_dir` with the library's card and upload it as `SLCAModel.push_to_hub`
        does: one commit to `hub_model_id` (or the output directory's name), a continual checkpoint when the
        model carries its run state. `kwargs`: `commit_description`, and `create_model_card`'s keywords.
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
        self.create_model_card(**card)  # refuses the keywords the card has no place for
        fields = self._card_fields(**{k: card.get(k) for k in ("license", "tags", "model_name", "dataset_tags",
                                                              "dataset")})
        args = self.args
        return self.slca_model.push_to_hub(
            self.hub_repo_id(), commit_message=commit_message, commit_description=commit_description,
            private=args.hub_private_repo if private is None else private,
            token=args.hub_token if token is None else token,
            revision=args.hub_revision if revision is None else revision,
            base_model_id=args.hub_base_model_id, card=fields,
        )

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """With `push_to_hub=True`, each save uploads the model the way `push_to_hub` does (checkpoint-N
        folders are not uploaded: they hold the model files only and cannot be resumed). A Hub failure is
        logged, not fatal: training goes on and the files are on disk."""
        if not self.is_world_process_zero() or self.args.hub_strategy == HubStrategy.END:
            return
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        if self.args.save_strategy == SaveStrategy.STEPS:
            message = f"Training in progress, step {self.state.global_step}"
        else:
            message = f"Training in progress, epoch {int(self.state.epoch or 0)}"
        try:
            self._upload(message)
        except Exception as err:  # noqa: BLE001 - any Hub/network error; training goes on
            logger.warning("pushing %s to %s failed (%s); training goes on, the files are in %s.",
                           Path(checkpoint_folder).name, self.hub_repo_id(), err, self.args.output_dir)
