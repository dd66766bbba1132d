"""Data for training: tokenizer loading, file discovery and streaming, packing, and the pretraining batches."""

from dlm.data_streams.packing import pack
from dlm.data_streams.pretrain import PretrainData, is_eval_document, load_pretrain_data
from dlm.data_streams.sources import detect_format, iter_documents, resolve_files
from dlm.data_streams.tokenizer import TokenizerInfo, bundled_tokenizer_dir, check_vocab, load_tokenizer

__all__ = [
    "PretrainData",
    "TokenizerInfo",
    "bundled_tokenizer_dir",
    "check_vocab",
    "detect_format",
    "is_eval_document",
    "iter_documents",
    "load_pretrain_data",
    "load_tokenizer",
    "pack",
    "resolve_files",
]
