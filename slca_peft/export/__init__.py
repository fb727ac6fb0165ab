"""Export to a plain transformers classifier that `pipeline("image-classification")` loads without slca-peft.

It builds on the model and the data transforms (the export's image processor), so it sits above them;
the Hub door and the cards it uses sit below the model (`slca_peft.sharing`)."""

from .classifier import export_model

__all__ = ["export_model"]
