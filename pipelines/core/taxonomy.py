"""The taxonomy: classification tasks and their canonical classes (the only place they are defined)."""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.core.errors import LeukopsError


@dataclass(frozen=True)
class Task:
    name: str
    classes: tuple[str, ...]
    description: str

    def index(self, label: str) -> int:
        return self.classes.index(label)


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("all_subtypes", ("Benign", "Early", "Pre", "Pro"), "B-ALL subtypes vs benign haematogones"),
        Task("binary_all", ("ALL", "Healthy"), "acute lymphoblastic leukaemia vs healthy"),
        Task("five_class", ("ALL", "AML", "CLL", "CML", "Healthy"), "leukaemia type vs healthy"),
        Task(
            "wbc",
            ("basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet"),
            "normal white-cell types",
        ),
    )
}


class UnknownTaskError(LeukopsError, ValueError):
    pass


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise UnknownTaskError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None
