"""Training: data preparation, tokenizer training, pretraining, fine-tuning, LoRA, checkpoints.

``prepare`` (``llmkit.train.data``) turns files into token shards; ``pretrain`` trains a model from
scratch on them; ``finetune`` adapts a loaded model on JSONL examples, with LoRA
(``llmkit.train.lora``: a transform on the loaded model) or all weights. Import the submodules;
this package imports nothing heavy.
"""
