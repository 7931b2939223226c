"""Runs fuzz_cases.CASES by name (argv), in this one process, printing BEGIN before and one
JSON RESULT line after each case. A case that kills the process leaves a BEGIN without a
RESULT: test_bad_inputs.py reports it as a crash and starts a new runner for the rest."""
import json
import sys
import warnings

import torch

import fusedattn
from fuzz_cases import CASES

warnings.simplefilter("ignore")
for name in sys.argv[1:]:
    code, _ = CASES[name]
    print("BEGIN " + name, flush=True)
    torch.manual_seed(0)
    if name.startswith(("compile/", "export/")):
        torch._dynamo.reset()
    try:
        exec(compile(code, name, "exec"), {"torch": torch, "fusedattn": fusedattn})
        result = {"name": name, "raised": None}
    except Exception as e:  # noqa: BLE001 - the type is what the test checks
        kind = type(e)
        qual = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
        result = {"name": name, "raised": qual, "message": str(e)[-4000:]}
    print("RESULT " + json.dumps(result), flush=True)
