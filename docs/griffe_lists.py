"""A griffe extension for the API reference: darts_eqx's docstrings open a list on the line after
its heading (`**Arguments:**` then `- name: ...`), which Markdown reads as one paragraph unless a
blank line comes first. This adds that blank line, outside code blocks, and changes nothing else."""

import re

import griffe

_ITEM = re.compile(r"^\s*(?:[-*+]|\d+\.)\s")


def blank_line_before_lists(text: str) -> str:
    lines, in_fence, in_list = [], False, False
    for line in text.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            in_fence = not in_fence
        if not in_fence:
            if not line.strip():
                in_list = False
            elif _ITEM.match(line):
                if not in_list and lines and lines[-1].strip():
                    lines.append("")
                in_list = True
        lines.append(line)
    return "\n".join(lines)


class BlankLineBeforeLists(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = blank_line_before_lists(obj.docstring.value)
