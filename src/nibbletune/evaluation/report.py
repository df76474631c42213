"""The result of an evaluation: base and base+adapter side by side, as a text table or JSON.

JSON (`EvalReport.to_dict`, what `nibbletune eval --json` prints):

    {"model": str, "adapter_dir": str | null, "data": str, "format": str, "seq_len": int,
     "max_new_tokens": int, "quantization": str, "device": str,
     "examples": int,               # held-out examples the loss covers
     "loss_tokens": int,            # supervised tokens the loss averages over
     "generation_examples": int, "generation_skipped": int,
     "base":    {"loss", "perplexity", "exact_match", "first_lines_match", "contains_answer"},
     "adapter": {same keys} | null,
     "change":  {same keys: adapter minus base} | null,
     "warnings": [str],
     "generations": [{"source", "reference", "base", "adapter" (null without an adapter)}]}

Rates are fractions in [0, 1], null when no row had a reference to generate against.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .scoring import ModelScores

LABELS = {"loss": "held-out loss", "perplexity": "perplexity", "exact_match": "exact match",
          "first_lines_match": "first lines match", "contains_answer": "contains answer"}
RATES = ("exact_match", "first_lines_match", "contains_answer")


@dataclass(frozen=True)
class EvalReport:
    """A base model and base+adapter scored on one held-out dataset (module docstring for the JSON form)."""

    model: str
    adapter_dir: str | None
    data: str
    format: str
    seq_len: int
    max_new_tokens: int
    quantization: str
    """How the base was loaded: its QuantSettings described, or "16-bit" for an adapter trained without 4-bit layers."""
    device: str
    examples: int
    """Held-out examples the loss covers (every row with a supervised token)."""
    loss_tokens: int
    sources: tuple[str, ...]
    """Where each generation example came from (file:line), in order."""
    references: tuple[str, ...]
    generation_skipped: int
    base: ModelScores
    adapter: ModelScores | None
    warnings: tuple[str, ...] = ()

    @property
    def generation_examples(self) -> int:
        """Rows scored by generation."""
        return len(self.references)

    def change(self) -> dict[str, float | None] | None:
        """Each metric of base+adapter minus the base's (None per metric without a value; None without an adapter)."""
        if self.adapter is None:
            return None
        before, after = self.base.metrics(), self.adapter.metrics()
        return {name: None if before[name] is None or after[name] is None else after[name] - before[name]
                for name in before}

    def to_dict(self) -> dict:
        """The report as JSON-ready data (module docstring)."""
        adapter_generations = self.adapter.generations if self.adapter else (None,) * len(self.references)
        return {
            "model": self.model, "adapter_dir": self.adapter_dir, "data": self.data, "format": self.format,
            "seq_len": self.seq_len, "max_new_tokens": self.max_new_tokens, "quantization": self.quantization,
            "device": self.device, "examples": self.examples, "loss_tokens": self.loss_tokens,
            "generation_examples": self.generation_examples, "generation_skipped": self.generation_skipped,
            "base": self.base.metrics(), "adapter": self.adapter.metrics() if self.adapter else None,
            "change": self.change(), "warnings": list(self.warnings),
            "generations": [{"source": source, "reference": reference, "base": base, "adapter": tuned}
                            for source, reference, base, tuned in
                            zip(self.sources, self.references, self.base.generations, adapter_generations)],
        }

    def to_json(self, indent: int | None = 2) -> str:
        """`to_dict` as JSON text."""
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    def table(self) -> str:
        """What was evaluated, then one aligned row per metric: base, base+adapter, change."""
        generated = (f"; {self.generation_examples} generated greedily, up to {self.max_new_tokens} new tokens"
                     if self.generation_examples else "; no generation (no row has a reference answer)")
        if self.generation_skipped:
            generated += f" ({self.generation_skipped} skipped: blank reference, empty or over-long prompt)"
        lines = [f"base     {self.model} ({self.quantization}; {self.device})"]
        if self.adapter_dir is not None:
            lines.append(f"adapter  {self.adapter_dir}")
        lines += [f"data     {self.data}: {self.format}, {self.examples} examples, {self.loss_tokens} supervised "
                  f"tokens (seq_len {self.seq_len}){generated}", ""]
        names = [name for name in LABELS if name not in RATES or self.generation_examples]
        header = ["metric", "base"] + (["base+adapter", "change"] if self.adapter else [])
        rows = [header]
        change = self.change()
        for name in names:
            row = [LABELS[name], _value(name, self.base.metrics()[name])]
            if self.adapter is not None:
                row += [_value(name, self.adapter.metrics()[name]), _change(name, change[name])]
            rows.append(row)
        widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
        for row in rows:
            cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]
            lines.append("  ".join(cells).rstrip())
        return "\n".join(lines)


def _value(name: str, value: float | None) -> str:
    if value is None:
        return "-"
    if name in RATES:
        return f"{100 * value:.1f}%"
    return f"{value:.4f}" if name == "loss" else _perplexity(value)


def _change(name: str, delta: float | None) -> str:
    if delta is None:
        return "-"
    if name in RATES:
        return f"{100 * delta:+.1f} pts"
    return f"{delta:+.4f}" if name == "loss" else f"{delta:+.4g}"


def _perplexity(value: float) -> str:
    return f"{value:.2f}" if value < 1e5 else f"{value:.3g}"
