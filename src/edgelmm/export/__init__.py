"""Export checkpoints to other engines' formats (`edgelmm export ...`)."""
