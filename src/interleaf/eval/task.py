"""What an evaluation task is: examples, a prompt template, a way to answer, a metric.

A task is data, not code: a :class:`TaskSpec` names a reader and its arguments (the files of
the benchmark in their standard layout), a few-shot template, how the model answers
(``generate`` free text, or ``rank`` candidate answers by likelihood), and the metric. Built-in
tasks live in ``interleaf.eval.tasks``; a user adds one with a YAML file of the same fields.
"""

from __future__ import annotations

import string
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

from interleaf.data.schema import ImageRef


@dataclass(frozen=True)
class Example:
    """One evaluation item.

    ``fields`` fill the template (e.g. ``question``); ``answers`` are the references (captions),
    human answers (VQA: ten), or the gold answer (classification: the class name);
    ``label`` is a binary label (HatefulMemes); ``options`` are the answers to rank: the
    choices of a multiple-choice item, or all class names of a classification task.
    """

    id: str
    image: ImageRef | None
    fields: dict[str, str] = field(default_factory=dict)
    answers: tuple[str, ...] = ()
    label: int | None = None
    options: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class TaskSpec:
    name: str
    reader: str  # a function name in interleaf.eval.readers
    query: dict[str, Any] = field(default_factory=dict)  # reader arguments for the evaluated split
    support: dict[str, Any] = field(default_factory=dict)  # reader arguments for the demonstrations
    template: str = "<image>Output:{answer}<|endofchunk|>"
    answer_mode: Literal["generate", "rank"] = "generate"
    candidates: Literal["options", "fixed"] = "options"  # for rank: each example's options, or fixed ones
    fixed_candidates: tuple[str, ...] = ()  # e.g. ("no", "yes") for HatefulMemes
    metric: Literal["cider", "vqa", "okvqa", "accuracy", "roc_auc"] = "accuracy"
    max_new_tokens: int = 20
    num_beams: int = 3
    length_penalty: float = 0.0  # OpenFlamingo's beam search: no length normalisation
    stop_strings: tuple[str, ...] = ()  # generation stops here, and the answer is cut before it
    demo_separator: str = ""  # after each demonstration (OpenFlamingo: "\n" for captioning and VQA)
    demo_answer: Literal["first", "most_common"] = "first"  # which reference a demonstration shows

    def __post_init__(self):
        names = {f for _, f, _, _ in string.Formatter().parse(self.template) if f}
        if "answer" not in names:
            raise ValueError(f"task {self.name}: the template must contain {{answer}}: {self.template!r}")

    @property
    def fields(self) -> set[str]:
        return {f for _, f, _, _ in string.Formatter().parse(self.template) if f and f != "answer"}

    def demonstration(self, example: Example, *, image: bool = True) -> str:
        """The template filled with the example's answer, then the separator; without
        ``image`` the image marker is dropped (OpenFlamingo's text-only demonstrations)."""
        text = self.template.format(answer=self.demo_answer_of(example), **self._fields(example))
        return (text if image else text.replace("<image>", "")) + self.demo_separator

    def demo_answer_of(self, example: Example) -> str:
        if not example.answers:
            raise ValueError(f"task {self.name}: demonstration {example.id!r} has no answer")
        if self.demo_answer == "first":
            return example.answers[0]
        return Counter(example.answers).most_common(1)[0][0]

    def query_text(self, example: Example) -> str:
        """The template up to where the answer goes, without the spaces before the answer:
        those belong to the answer's first token (``Answer: yes`` tokenizes as ``Answer:`` +
        `` yes``), so a prompt must not end in them."""
        head = self.template.split("{answer}")[0]
        return head.format(**self._fields(example)).rstrip(" ")

    @property
    def answer_prefix(self) -> str:
        """The spaces the template puts between the prompt and the answer."""
        head = self.template.split("{answer}")[0]
        return head[len(head.rstrip(" ")) :]

    def _fields(self, example: Example) -> dict[str, str]:
        missing = self.fields - set(example.fields)
        if missing:
            raise ValueError(f"task {self.name}: example {example.id!r} lacks template field(s) {sorted(missing)}")
        return {k: example.fields[k] for k in self.fields}
