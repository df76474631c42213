"""Recipes: whole jobs built from the stages below, with no machinery of their own.

`quickstart` (the offline demo: a tiny base pretrained with `nibbletune.training` method full, then
QLoRA-fine-tuned with it) and `tiny` (small tokenizers and Llama models built from scratch, for
the demo and for tests). This package sits at the top of the import order: nothing below imports it.
"""
