"""Tool (function) calling on the chat route, as OpenAI's API and vLLM offer it.

The model is asked to call a function by writing ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
(the Hermes/Qwen convention, which many chat templates already teach). A chat template that knows
tools gets them as its ``tools`` variable, as transformers passes them; for one that does not, llmkit
writes the functions and that format into the system prompt, and turns earlier calls and their
results into text the template can render.

``tool_choice``: "auto" generates freely and parses what came out; "required" and a named function
are enforced while decoding (a JSON-schema grammar over ``{"name": <const>, "arguments": <the
function's parameters>}`` between the tags), so the call always parses and its arguments validate;
"none" renders no tools.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from llmkit.server.errors import bad_request

OPEN, CLOSE = "<tool_call>", "</tool_call>"
WRAP = (OPEN + "\n", "\n" + CLOSE)  # what a call enforced while decoding is written between
_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.S)
_TOOLS_VARIABLE = re.compile(r"\btools\b")
_DEFS = ("$defs", "definitions")


@dataclass
class ToolPlan:
    """What one request asked for: the tools, and how the model may use them."""

    tools: list[dict]  # OpenAI tool objects {"type": "function", "function": {...}}
    choice: str  # "none", "auto", "required", or "function" (the one named in `name`)
    name: str | None = None
    parallel: bool = True
    legacy: bool = False  # asked with functions/function_call: answered with message.function_call

    @property
    def offered(self) -> bool:
        return self.choice != "none"

    @property
    def functions(self) -> dict[str, dict]:
        return {t["function"]["name"]: t["function"] for t in self.tools}

    def schema(self) -> dict | None:
        """The JSON schema a call must match when it is enforced ("required" or a named function)."""
        if self.choice == "function":
            return _call_schema([self.functions[self.name]])
        if self.choice == "required":
            return _call_schema(list(self.functions.values()))
        return None


def plan_for(req) -> ToolPlan | None:
    """The request's tool plan (None without tools), or a 400 that names the parameter at fault."""
    tools, choice, param = req.tools, req.tool_choice, "tool_choice"
    legacy = False
    if req.functions is not None or req.function_call is not None:
        if tools is not None or choice is not None:
            raise bad_request("Give tools and tool_choice, or the legacy functions and function_call, not both.",
                              param="functions")
        legacy, param = True, "function_call"
        tools = [{"type": "function", "function": f.model_dump(exclude_none=True)} for f in req.functions or []]
        tools = tools or None
        choice = req.function_call
        if choice is not None and not isinstance(choice, str):
            choice = {"type": "function", "function": {"name": choice.name}}
    elif tools is not None:
        tools = [t.model_dump(exclude_none=True) for t in tools]
    if choice is not None and not isinstance(choice, (str, dict)):
        choice = choice.model_dump()
    if tools is None:
        if choice not in (None, "none", "auto"):
            raise bad_request(f"{param} asks for a function call but the request offers no tools.", param=param)
        return None
    names = [t["function"]["name"] for t in tools]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise bad_request(f"Each tool needs its own name; {', '.join(twice)} appears more than once.",
                          param="functions" if legacy else "tools")
    plan = ToolPlan(tools, "auto", parallel=req.parallel_tool_calls is not False, legacy=legacy)
    if isinstance(choice, str):
        plan.choice = choice
    elif choice is not None:
        name = choice["function"]["name"]
        if name not in names:
            raise bad_request(f"{param} names the function {name!r}, which is not among the tools offered "
                              f"({', '.join(names)}).", param=param, code="invalid_value")
        plan.choice, plan.name = "function", name
    if plan.choice in ("required", "function"):  # refuse what the mask cannot enforce before any work is done
        from llmkit.constrain import UnsupportedSchemaError, check_schema

        enforced = [plan.functions[plan.name]] if plan.choice == "function" else list(plan.functions.values())
        for f in enforced:  # each function's parameters alone first: building the call's schema reads them
            try:
                check_schema(f.get("parameters") or {})
            except UnsupportedSchemaError as exc:
                raise bad_request(f"The parameters of {f['name']} cannot be enforced while decoding: {exc}",
                                  param="functions" if legacy else "tools", code="unsupported_schema") from None
        try:
            check_schema(plan.schema())
        except UnsupportedSchemaError as exc:
            raise bad_request(f"A tool's parameters cannot be enforced while decoding: {exc}",
                              param="functions" if legacy else "tools", code="unsupported_schema") from None
    return plan


def _call_schema(functions: list[dict]) -> dict:
    """{"name": const, "arguments": parameters}, one alternative per function. The parameters'
    definitions ($defs) move to the top, where their "#/$defs/..." references point."""
    defs: dict[str, dict] = {}
    alternatives = []
    for f in functions:
        params = dict(f.get("parameters") or {"type": "object", "properties": {}, "additionalProperties": False})
        for key in _DEFS:
            for name, sub in (params.pop(key, None) or {}).items():
                if defs.setdefault(key, {}).setdefault(name, sub) != sub:
                    raise bad_request(f"The tools define {key}/{name} in different ways; it cannot be enforced for "
                                      "several functions at once. Rename it in one of them.", param="tools",
                                      code="unsupported_schema")
        _check_refs(params, f["name"])
        alternatives.append({"type": "object", "properties": {"name": {"const": f["name"]}, "arguments": params},
                             "required": ["name", "arguments"], "additionalProperties": False})
    schema = alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}
    return {**schema, **defs}


def _check_refs(schema: Any, function: str) -> None:
    if isinstance(schema, dict):
        ref = schema.get("$ref")
        if isinstance(ref, str) and not ref.startswith(tuple(f"#/{k}/" for k in _DEFS)):
            raise bad_request(f"The parameters of {function} hold the reference {ref!r}; only references into "
                              "$defs or definitions can be enforced.", param="tools", code="unsupported_schema")
        for value in schema.values():
            _check_refs(value, function)
    elif isinstance(schema, list):
        for value in schema:
            _check_refs(value, function)


# ------------------------------------------------------------------------------------------ prompts


def template_knows_tools(template: str) -> bool:
    return bool(_TOOLS_VARIABLE.search(template))


def template_call(call, fallback_id: str) -> dict:
    """A call from the conversation (schemas.ToolCall) as templates read it: arguments as an object."""
    arguments = call.function.arguments
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass  # left as the text it is
    return {"id": call.id or fallback_id, "type": "function",
            "function": {"name": call.function.name, "arguments": arguments}}


def prepare(chat: list[dict], plan: ToolPlan | None, native: bool) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools) for ``apply_chat_template``. native: the template renders tools itself."""
    tools = plan.tools if plan is not None and plan.offered else None
    if native:
        return chat, tools
    out: list[dict] = []
    for m in chat:
        m = dict(m)
        calls = m.pop("tool_calls", None)
        if calls:
            text = "\n".join(_call_text(c["function"]) for c in calls)
            m["content"] = f"{m['content']}\n{text}" if m.get("content") else text
        if m["role"] == "tool":
            result = f"<tool_response>\n{m.get('content', '')}\n</tool_response>"
            if out and out[-1].get("_results"):  # results of one turn's calls go in one message
                out[-1]["content"] += "\n" + result
                continue
            m = {"role": "user", "content": result, "_results": True}
        out.append(m)
    for m in out:
        m.pop("_results", None)
    if tools is not None:
        prompt = system_prompt(plan)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0].get('content') or ''}\n\n{prompt}".lstrip()}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out, None


def _call_text(function: dict) -> str:
    call = {"name": function["name"], "arguments": function["arguments"]}
    return f"{OPEN}\n{json.dumps(call, ensure_ascii=False)}\n{CLOSE}"


def system_prompt(plan: ToolPlan) -> str:
    """llmkit's description of the tools, for chat templates that do not describe them."""
    lines = ["You can call functions. Here they are, as JSON schemas:"]
    lines += [json.dumps(t["function"], ensure_ascii=False) for t in plan.tools]
    lines += ["", "To call a function, answer with", OPEN,
              '{"name": "<the function\'s name>", "arguments": {<the arguments, as a JSON object>}}', CLOSE,
              "and nothing after it. Each result comes back between <tool_response> and </tool_response>."]
    if plan.choice == "function":
        lines.append(f"Call the function {plan.name} now.")
    elif plan.choice == "required":
        lines.append("Call a function now.")
    else:
        lines.append("When no function is needed, answer in plain text.")
    if not plan.parallel:
        lines.append("Call one function at a time.")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ output


def parse(text: str, plan: ToolPlan) -> tuple[str | None, list[dict]]:
    """(content, tool calls) of a generated text. Content is the text before the first call (None
    when there is none); without a well-formed call of an offered function, the whole text is content."""
    start = text.find(OPEN)
    if start < 0:
        return text, []
    calls = [c for c in (_call(m.group(1), plan) for m in _BLOCK.finditer(text, start)) if c is not None]
    if not calls:
        return text, []
    if not plan.parallel:
        calls = calls[:1]
    return text[:start].rstrip() or None, calls


def _call(body: str, plan: ToolPlan) -> dict | None:
    try:
        value, _ = json.JSONDecoder().raw_decode(body.strip())
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict):
        return None
    name = value.get("name")
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if name not in plan.functions or not isinstance(arguments, dict):
        return None
    if plan.choice == "function" and name != plan.name:
        return None
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


class StreamSplitter:
    """One streamed choice: passes text on as content until a tool call may have begun, then holds
    the rest until the end, when ``finish`` tells what was held (content, or calls)."""

    def __init__(self, plan: ToolPlan):
        self.plan = plan
        self.text = ""
        self.sent = 0  # characters of text already passed on
        self.holding = False  # a call has begun

    def feed(self, piece: str) -> str:
        """Take the next piece of text; return what can go out as content now."""
        self.text += piece
        if self.holding:
            return ""
        at = self.text.find(OPEN, self.sent)
        if at >= 0:
            self.holding = True
            safe = len(self.text[:at].rstrip())  # as parse() cuts the content
        else:
            safe = len(self.text) - _partial_tag(self.text)
            safe = len(self.text[:safe].rstrip())  # trailing space may turn out to precede a call
        out = self.text[self.sent:max(safe, self.sent)]
        self.sent = max(safe, self.sent)
        return out

    def finish(self) -> tuple[str, list[dict]]:
        """(content not yet passed on, calls)."""
        content, calls = parse(self.text, self.plan)
        rest = (content or "")[self.sent:] if calls else self.text[self.sent:]
        self.sent = len(self.text)
        return rest, calls


def _partial_tag(text: str) -> int:
    """How many characters at the end of text could begin the opening tag."""
    for k in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if text.endswith(OPEN[:k]):
            return k
    return 0
