"""Tool calling (`tools`, `tool_choice`) for models whose tool-call format the kit knows.

The kit renders every prompt itself, so it also renders the tools, and reads the calls back out of
the answer. InternLM2's format (InternLM's chat format, and what LMDeploy's `internlm` tool parser
reads):
- the functions go in a system message of their own, `<|im_start|>system name=<|plugin|>` with
  the function list as JSON;
- the model calls one as `<|action_start|><|plugin|>\\n{"name": ..., "parameters": {...}}<|action_end|>`;
- a tool's result comes back as `<|im_start|>environment name=<|plugin|>`.
`tool_choice` "required" or a named function is enforced with LMDeploy's guided decoding: an
xgrammar structural tag that admits only calls of the allowed functions with arguments that
follow their JSON schema (the tag LMDeploy's own server builds for "required"). "auto" lets the
model choose; "none" renders no tools at all.

While tools are in play the answer is collected whole before it is sent, also when streamed:
whether text is a call is known only once its tag is complete.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from deploy.engines import Delta

ACTION_START = "<|action_start|><|plugin|>"
ACTION_END = "<|action_end|>"
PLUGIN_ROLE = "system name=<|plugin|>"
RESULT_ROLE = "environment name=<|plugin|>"
DIALECTS = {"internlm2": "InternLM2"}  # model_type -> the format above
_CALL = re.compile(re.escape(ACTION_START) + r"\s*(.*?)\s*(?:" + re.escape(ACTION_END) + r"|$)", re.S)


class ToolError(ValueError):
    """A tools request the kit cannot serve: the message names the field and says what to do."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ToolPlan:
    """The functions the model may call and how: choice is "auto", "required" or "function" (the
    one named `name`; a function may well be called "auto")."""

    functions: tuple[dict, ...]
    choice: str
    parallel: bool = True
    name: str | None = None

    def allowed(self) -> tuple[dict, ...]:
        if self.choice != "function":
            return self.functions
        return tuple(f for f in self.functions if f["name"] == self.name)


def plan(tools: list[dict] | None, tool_choice: str | dict | None, parallel: bool | None) -> ToolPlan | None:
    """The request's tools, checked; None where no tool is in play (none given, or "none")."""
    choice = tool_choice if tool_choice is not None else ("auto" if tools else "none")
    name = None
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
        if not isinstance(name, str):
            raise ToolError('tool_choice must be "none", "auto", "required" or '
                            '{"type": "function", "function": {"name": ...}}', "tool_choice")
        choice = "function"
    elif choice not in ("none", "auto", "required"):
        raise ToolError(f'tool_choice {choice!r} is not one of "none", "auto", "required"', "tool_choice")
    if choice == "none":
        return None
    if not tools:
        raise ToolError(f"tool_choice {name or choice!r} needs tools", "tools")
    functions = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if tool.get("type") == "function" else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ToolError(f'tools[{i}] must be {{"type": "function", "function": {{"name": ..., '
                            '"parameters": {...}}}}', "tools")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise ToolError(f"tools[{i}].function.parameters must be a JSON schema object", "tools")
        functions.append({"name": function["name"], "description": function.get("description", ""),
                          "parameters": parameters})
    if name is not None and name not in {f["name"] for f in functions}:
        raise ToolError(f"tool_choice names {name!r}, which is not among the tools", "tool_choice")
    return ToolPlan(tuple(functions), choice, parallel is not False, name)


def dialect_for(model_type: str | None) -> str | None:
    return DIALECTS.get(model_type or "")


def render(messages: list[dict], tool_plan: ToolPlan | None) -> list[dict]:
    """Messages as InternLM2's chat template expects them: the functions in a plugin system
    message after the leading system messages, earlier calls written out as the model writes
    them, and tool results as environment messages."""
    out: list[dict] = []
    for message in messages:
        role, content = message["role"], message.get("content") or ""
        if role == "tool":
            out.append({"role": RESULT_ROLE, "content": content})
        elif role == "assistant" and message.get("tool_calls"):
            calls = "".join(_action(call) for call in message["tool_calls"])
            out.append({"role": "assistant", "content": content + calls})
        else:
            out.append({"role": role, "content": content})
    if tool_plan is not None:
        leading = next((i for i, m in enumerate(out) if m["role"] != "system"), len(out))
        out.insert(leading, {"role": PLUGIN_ROLE,
                             "content": json.dumps(list(tool_plan.allowed()), ensure_ascii=False)})
    return out


def _action(call: dict) -> str:
    function = call.get("function") or {}
    try:
        parameters = json.loads(function.get("arguments") or "{}")
    except json.JSONDecodeError:
        parameters = function.get("arguments")
    body = json.dumps({"name": function.get("name"), "parameters": parameters}, ensure_ascii=False)
    return f"{ACTION_START}\n{body}{ACTION_END}"


def guided(tool_plan: ToolPlan) -> dict | None:
    """The structural tag that makes the model call an allowed function ("required" or a named
    choice); None for "auto". The same tag as LMDeploy 0.18's InternLM2 tool parser builds."""
    if tool_plan.choice == "auto":
        return None
    tags = [{"type": "tag",
             "begin": f'{ACTION_START}{{"name": {json.dumps(f["name"])}, "parameters": ',
             "content": {"type": "json_schema", "json_schema": f["parameters"]},
             "end": "}" + ACTION_END} for f in tool_plan.allowed()]
    calls = {"type": "tags_with_separator", "tags": tags, "separator": "\n", "at_least_one": True,
             "stop_after_first": not tool_plan.parallel}
    return {"type": "structural_tag",
            "format": {"type": "sequence", "elements": [calls, {"type": "regex", "pattern": r"\s*"}]}}


def parse(text: str) -> tuple[str, list[dict]]:
    """The answer's text outside its calls, and the calls in OpenAI's form. A call whose JSON
    does not parse stays in the text: the client sees what the model wrote."""
    calls, kept, last = [], [], 0
    for match in _CALL.finditer(text):
        try:
            body = json.loads(match.group(1))
            name, parameters = body["name"], body.get("parameters", body.get("arguments", {}))
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
        if not isinstance(name, str):
            continue
        kept.append(text[last:match.start()])
        last = match.end()
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": name, "arguments": parameters if isinstance(parameters, str)
                                   else json.dumps(parameters, ensure_ascii=False)}})
    kept.append(text[last:])
    return "".join(kept).strip(), calls


@dataclass
class ToolDelta(Delta):
    """A whole answer whose calls were read out of its text."""

    tool_calls: list[dict] | None = None


async def with_calls(stream: AsyncIterator[Delta], parallel: bool = True) -> AsyncIterator[Delta]:
    """The stream collected whole, then as one piece: the text outside the calls, the calls (the
    first only where `parallel` is off, as parallel_tool_calls: false asks), finish "tool_calls"
    where there are any, and the counts."""
    pieces, last, scores = [], Delta(), None
    try:
        async for delta in stream:
            pieces.append(delta.text)
            if delta.logprobs is not None:  # asked for: every token's, calls included
                scores = (scores or []) + delta.logprobs
            last = delta
    finally:
        await stream.aclose()
    content, calls = parse("".join(pieces))
    calls = calls if parallel else calls[:1]
    yield ToolDelta(content, "tool_calls" if calls else last.finish_reason, last.prompt_tokens,
                    last.completion_tokens, scores, calls or None)
