"""Evaluation metrics equal to the reference implementations: CIDEr (pycocoevalcap), VQA accuracy (the official VQA
API and OpenFlamingo's copy), OK-VQA stemming, ROC AUC, top-1 and multiple-choice accuracy."""

from interleaf.eval.metrics.cider import cider, cider_d, cider_scores, java_tokenizer_available, ptb_tokenize
from interleaf.eval.metrics.classification import multiple_choice_accuracy, roc_auc, top1_accuracy
from interleaf.eval.metrics.ptb import python_tokenize
from interleaf.eval.metrics.vqa import normalize_answer, okvqa_stem, vqa_accuracy, vqa_corpus_accuracy

__all__ = [
    "cider",
    "cider_d",
    "cider_scores",
    "java_tokenizer_available",
    "multiple_choice_accuracy",
    "normalize_answer",
    "okvqa_stem",
    "ptb_tokenize",
    "python_tokenize",
    "roc_auc",
    "top1_accuracy",
    "vqa_accuracy",
    "vqa_corpus_accuracy",
]
