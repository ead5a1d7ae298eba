"""Small, learnable datasets in every supported schema, written as the files a user would upload."""
from __future__ import annotations

import json
from pathlib import Path

FACTS = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
         ("Egypt", "Cairo"), ("Peru", "Lima"), ("Chile", "Santiago"), ("Kenya", "Nairobi")]


def _rows(schema: str) -> list[dict]:
    rows = []
    for country, capital in FACTS:
        question, answer = f"What is the capital of {country}?", f"The capital of {country} is {capital}."
        if schema == "chat":
            rows.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
        elif schema == "sharegpt":
            rows.append({"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]})
        elif schema == "alpaca":
            rows.append({"instruction": "Answer the question.", "input": question, "output": answer})
        elif schema == "prompt_completion":
            rows.append({"prompt": question, "completion": answer})
        elif schema == "text":
            rows.append({"text": f"{question} {answer} " * 3})
    return rows


def write_dataset(folder: Path, schema: str, file_format: str = "jsonl") -> Path:
    rows = _rows(schema)
    path = Path(folder) / f"{schema}.{file_format}"
    if file_format == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif file_format == "json":
        path.write_text(json.dumps(rows))
    elif file_format == "txt":
        path.write_text("\n\n".join(r["text"] for r in rows) + "\n")
    else:
        raise ValueError(file_format)
    return path
