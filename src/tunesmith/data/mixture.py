"""Which training example comes next: one data set's seeded shuffle (ExampleStream), or a mixture of named tasks
(MixtureStream) whose task order follows the mixture weights exactly. Both are resumable from one integer position."""

from __future__ import annotations

from dataclasses import dataclass

import torch


class ExampleStream:
    """An endless, seeded stream of example indices, one fresh permutation per epoch; its position is resumable."""

    def __init__(self, n: int, seed: int, position: int = 0):
        self.n, self.seed, self.position = n, seed, position
        self._cached: tuple[int, list[int]] | None = None

    def _order(self, epoch: int) -> list[int]:
        if self._cached is None or self._cached[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cached = (epoch, torch.randperm(self.n, generator=g).tolist())
        return self._cached[1]

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            epoch, offset = divmod(self.position, self.n)
            order = self._order(epoch)
            grab = order[offset : offset + k - len(out)]
            out.extend(grab)
            self.position += len(grab)
        return out


def mixture_weights(kind: str, sizes: list[int], explicit: list[float | None], temperature: float) -> list[float]:
    """Normalised task weights: proportional to each task's train size, to size^(1/T) (T > 1 flattens the mixture
    toward uniform), or the explicit weights as given."""
    if kind == "proportional":
        raw = [float(n) for n in sizes]
    elif kind == "temperature":
        raw = [float(n) ** (1.0 / temperature) if n else 0.0 for n in sizes]
    else:
        raw = [float(w) for w in explicit]
    total = sum(raw)
    return [w / total for w in raw]


@dataclass
class TaskSlice:
    """A task's examples inside the concatenated train list: train[offset : offset + size]."""
    name: str
    offset: int
    size: int
    weight: float


class MixtureStream:
    """Task by task: at global position p the next example comes from the task t with the largest (p + 1)·w_t − c_t
    (c_t: examples task t has had so far; ties to the first task), so after any p examples every task has had
    p·w_t of them to within one. Within a task, examples come in that task's own seeded shuffle. The whole state is
    the global position: a resumed run replays the task order up to it and continues exactly."""

    def __init__(self, tasks: list[TaskSlice], seed: int, position: int = 0):
        self.tasks = tasks
        self.streams = [ExampleStream(t.size, seed + 7919 * (i + 1)) for i, t in enumerate(tasks)]
        self.counts = [0] * len(tasks)
        self.position = 0
        for _ in range(position):
            self._next_task()

    def _next_task(self) -> int:
        p = self.position
        best = max(range(len(self.tasks)), key=lambda i: ((p + 1) * self.tasks[i].weight - self.counts[i], -i))
        self.counts[best] += 1
        self.position += 1
        return best

    def take(self, k: int) -> list[int]:
        out = []
        for _ in range(k):
            i = self._next_task()
            stream = self.streams[i]
            stream.position = self.counts[i] - 1
            out.append(self.tasks[i].offset + stream.take(1)[0])
        return out

    def shares(self) -> dict[str, float]:
        """The fraction of the examples drawn so far that each task supplied."""
        return {t.name: c / max(1, self.position) for t, c in zip(self.tasks, self.counts)}
