"""Structured outputs are valid whatever the weights: requests through the server (the FastAPI
app, in process) with `tool_choice: "required"` over 13 tools, and with a
`json_schema` response_format, on a random-weights NeMo-shaped model (Tekken, the worst
case) and on the demo model (its chat format has no tools: the generic text format).

    python benchmarks/structured_validity.py [--requests 200] [--n 10] [--max-tokens 256]

Tools: benchmarks/data/tool_calls_train.jsonl's 12 (patterns, enums, integer and number
ranges, optional fields) and `plan_trip` (nested objects in a bounded array). Random weights
never close a string whose length is unbounded, so for the random model every string gets a
maxLength of 24 (a schema choice a client can make; the demo model keeps the schemas as they
are). --requests completions are asked, n at a time, at temperature 1. A reply is valid when
it finished with tool calls whose names are among the tools and whose arguments validate
against the tool's schema (json_schema: the content parses and validates); a reply cut by
max_tokens counts as cut, anything else as invalid.
Writes benchmarks/results/structured_validity.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path
from typing import Any

import jsonschema
import torch
from common import save, table
from fastapi.testclient import TestClient

from mistral_nemo import LLM, ModelConfig
from mistral_nemo.checkpoint.random_init import init_random
from mistral_nemo.demo import demo_model_path
from mistral_nemo.server import create_app

DATA = Path(__file__).resolve().parent / "data"
PLAN = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "units": {"enum": ["celsius", "fahrenheit"]},
        "stops": {
            "type": "array",
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "nights": {"type": "integer", "minimum": 1, "maximum": 9},
                },
                "required": ["name", "nights"],
                "additionalProperties": False,
            },
        },
        "budget": {"type": "number", "minimum": 0, "maximum": 10000},
    },
    "required": ["city", "days", "units", "stops", "budget"],
    "additionalProperties": False,
}


def bounded(schema: Any, length: int) -> Any:
    """`schema` with a maxLength on every string that has none."""
    schema = copy.deepcopy(schema)

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "string" and "maxLength" not in node and "enum" not in node:
                node["maxLength"] = length
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(schema)
    return schema


def run(llm: LLM, tools: list[dict], plan: dict, args: argparse.Namespace) -> list[dict]:
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    base = {
        "model": "m",
        "max_tokens": args.max_tokens,
        "temperature": 1.0,
        "n": args.n,
    }
    asks = {
        # One call a reply: random weights would otherwise add calls until max_tokens.
        "tool_choice required": {
            "tools": tools,
            "tool_choice": "required",
            "parallel_tool_calls": False,
        },
        "response_format json_schema": {
            "response_format": {"type": "json_schema", "json_schema": {"schema": plan}}
        },
    }
    rows = []
    with TestClient(create_app(llm, "m")) as client:
        for name, ask in asks.items():
            counts = {"valid": 0, "cut": 0, "invalid": 0}
            for i in range(args.requests // args.n):
                prompt = f"Request {i}: help me with my trip and my messages."
                body = {**base, **ask, "seed": i, "messages": [{"role": "user", "content": prompt}]}
                reply = client.post("/v1/chat/completions", json=body)
                reply.raise_for_status()
                for choice in reply.json()["choices"]:
                    counts[verdict(choice, schemas, plan if "json" in name else None)] += 1
            rows.append(
                {"request": name, **counts, "valid %": 100 * counts["valid"] / args.requests}
            )
    return rows


def verdict(choice: dict, schemas: dict[str, dict], plan: dict | None) -> str:
    if choice["finish_reason"] == "length":
        return "cut"
    message = choice["message"]
    try:
        if plan is not None:
            jsonschema.validate(json.loads(message["content"]), plan)
            return "valid"
        calls = message.get("tool_calls") or []
        if choice["finish_reason"] != "tool_calls" or not calls:
            return "invalid"
        for call in calls:
            arguments = json.loads(call["function"]["arguments"])
            jsonschema.validate(arguments, schemas[call["function"]["name"]])
    except (ValueError, KeyError, TypeError, jsonschema.ValidationError):
        return "invalid"
    return "valid"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=256)
    args = parser.parse_args()
    torch.manual_seed(0)
    tools = json.loads((DATA / "tool_calls_train.jsonl").open().readline())["tools"]
    plan_tool = {"name": "plan_trip", "description": "Plan a trip", "parameters": PLAN}
    tools.append({"type": "function", "function": plan_tool})  # nested objects, an array
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        init_random(Path(tmp), ModelConfig.preset("tiny"), "mistral", dtype=torch.float32)
        models = {
            "random weights (Tekken, tiny)": (LLM(tmp), bounded(tools, 24), bounded(PLAN, 24)),
            "demo (SmolLM2-135M, text tools)": (LLM(demo_model_path()), tools, PLAN),
        }
        for model, (llm, model_tools, plan) in models.items():
            for row in run(llm, model_tools, plan, args):
                rows.append({"model": model, **row})
                print(rows[-1], flush=True)
    print(table(rows, list(rows[0])))
    out = save("structured_validity", {"args": vars(args), "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
