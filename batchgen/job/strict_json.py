"""Standard JSON text for JSONL parts and exports: values an input holds that the json module
would write as non-JSON (NaN) or not at all (dates, decimals, bytes, numpy values)."""
from __future__ import annotations

import base64
import datetime
import decimal
import json
import math
from typing import Any


def json_text(value: Any) -> str:
    """`value` as standard JSON on one line, NaN and +-inf floats as null: Python would write
    them as the bare tokens `NaN` / `Infinity`, which are not JSON, and jq, DuckDB and most
    parsers then reject the whole file. (Parquet parts keep NaN: a float column holds it.)"""
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False, default=json_default)
    except ValueError:  # a non-finite float somewhere: rare, so only then is it rebuilt
        return json.dumps(_finite(value), ensure_ascii=False, allow_nan=False,
                          default=json_default)


def _finite(value: Any) -> Any:
    """`value` with each non-finite float (nested too) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if value is None or isinstance(value, (str, int)):
        return value
    return _finite(json_default(value))  # numpy values, dates, bytes, ...


def json_default(value: Any) -> Any:
    if isinstance(value, (datetime.date, datetime.datetime, datetime.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode("ascii")
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
