"""Train a ViT over a sequence of tasks with SLCA++ and report accuracies (see `slca_peft.commands.recipe`).

    python recipes/train_seq.py                      # offline demo: digits, tiny ViT
    accelerate launch recipes/train_seq.py --config recipes/configs/cifar100_in21k_slca++.yaml

Same as `slca-peft train ...`; every SLCAConfig / TrainingArguments field is a flag.
"""

from slca_peft.commands import train as main

if __name__ == "__main__":
    main()
