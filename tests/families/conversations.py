"""The rendered conversations each family's tokenizer must tokenize exactly as llama.cpp does."""

from __future__ import annotations

SYSTEM = {"role": "system", "content": "You are a careful legal assistant. Answer briefly."}
Q1 = {"role": "user", "content": "Can my landlord raise the rent without notice?"}
A1 = {"role": "assistant", "content": "No.\n\nIn most places a written notice is required first."}
Q2 = {"role": "user", "content": "How long is the notice?  Usually 30 days? (asking for a friend)"}
A2 = {"role": "assistant", "content": "Often 30 to 60 days; it depends on the lease."}
TOOL_CALL = {"role": "assistant", "content": "", "tool_calls": [
    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
TOOL_RESULT = {"role": "tool", "name": "get_weather", "content": "{\"temperature\": 21}"}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                   "required": ["city"]}}}]


def cases(tools: bool, thinking: bool) -> list[tuple[str, list[dict], dict]]:
    """``(label, messages, apply_chat_template kwargs)`` for one family."""
    out = [
        ("system", [SYSTEM, Q1, A1], {}),
        ("no-system", [Q1, A1], {}),
        ("multi-turn", [SYSTEM, Q1, A1, Q2, A2], {}),
        ("generation-prompt", [Q1, A1, Q2], {"add_generation_prompt": True}),
    ]
    if tools:
        out.append(("tools", [Q1, TOOL_CALL, TOOL_RESULT, A2], {"tools": TOOLS}))
    if thinking:
        out.append(("thinking-off", [Q1, A1, Q2], {"add_generation_prompt": True, "enable_thinking": False}))
        out.append(("thinking-on", [Q1, A1, Q2], {"add_generation_prompt": True, "enable_thinking": True}))
    return out
