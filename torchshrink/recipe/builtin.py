"""Built-in recipes, selectable by name (``--recipe demo``)."""

BUILTIN: dict[str, str] = {
    "demo": """\
name: demo
stages:
  - kind: cast
    dtype: bfloat16
""",
    "fp16": """\
name: fp16
stages:
  - kind: cast
    dtype: float16
""",
    "bf16": """\
name: bf16
stages:
  - kind: cast
    dtype: bfloat16
""",
}
