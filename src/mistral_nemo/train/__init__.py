"""Training: pre-training corpora and SFT conversations packed into micro-batches, the
block-causal attention of packed documents, and the training loop."""

from mistral_nemo.train.data import pretraining_data
from mistral_nemo.train.packing import Batch, DataError, DocumentAttention, TrainData
from mistral_nemo.train.sft import ChatTemplateError, sft_data, show_masking

__all__ = [
    "Batch",
    "ChatTemplateError",
    "DataError",
    "DocumentAttention",
    "TrainData",
    "pretraining_data",
    "sft_data",
    "show_masking",
]
