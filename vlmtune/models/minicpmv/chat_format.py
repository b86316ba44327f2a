"""The chat prompt of MiniCPM-V 2.0, MiniCPM-V 2.6 and MiniCPM-o 2.6, as each official `chat()` builds it.

Step 1, message content: `chat()` turns a message's content list into one string, each image
becoming `(<image>./</image>)`, the items joined by "\\n". vlmtune gets content as HF parts
(`{"type": "image"}`, `{"type": "text", ...}`) and joins them the same way, except that no "\\n"
is added where the text at the join already has one: data files write `<image>\\nquestion`, and the
official `finetune/dataset.py` replaces `<image>` in place, so `[image, "\\nquestion"]` must give
`(<image>./</image>)\\nquestion` (what both the official training and `chat(msgs=[image,
"question"])` produce), not a doubled newline.

Step 2, the frame:
- 2.6 and o-2.6: `chat()` renders the string messages with the tokenizer's own chat template
  (`tokenizer_config.json`), so vlmtune renders them with the checkpoint's template too: prompts
  are the official ones exactly, the default system prompt included exactly when that template
  adds it. The answer is trained up to and including `<|im_end|>`, as in the official
  `conversation_to_ids_qwen2` (context 0 from after `assistant\\n` through `<|im_end|>`).
  Two deliberate differences from the official `finetune/dataset.py`, both following `chat()`
  instead: every image gets its `<image_id>N</image_id>` (the finetune script writes it only for
  images it slices), and `<image_xx>` keys are replaced in place (the script re-joins the text
  around them with extra "\\n"s).
- 2.0: the checkpoint has no template; `chat()` builds `<s><用户>{user}<AI>{assistant}...<AI>`
  in Python. vlmtune writes that as `MINICPMV2_TEMPLATE`, with one deliberate difference: every
  assistant turn ends with `</s>`. The official `conversation_to_ids_minicpm` trains each answer
  to end with `</s>` (a label after every answer, and the text `</s>` after the last one), but
  leaves it out of the input of earlier turns; vlmtune trains on input tokens only, so the `</s>`
  is in the text after every answer, and the history of a multi-turn prompt carries it too. The
  answer is trained up to and including `</s>`. The official finetune script also drops the `<s>`
  that `chat()` puts first; vlmtune keeps it (prompts equal `chat()`'s). 2.0 has no system role
  (`chat()` asserts user/assistant): a system turn is an error.
"""

from __future__ import annotations

from vlmtune.errors import DataError, VlmtuneError

IMAGE_TAG = "(<image>./</image>)"  # what `chat()` writes for an image; the processor expands it

# MiniCPM-V 2.0's `chat()` prompt as a template over string contents (written for vlmtune).
MINICPMV2_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}<用户>{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}<AI>{{ message['content'] }}{{ eos_token }}"
    "{% else %}{{ raise_exception('MiniCPM-V 2.0 has only user and assistant turns') }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<AI>{% endif %}"
)

# The ChatML template of the MiniCPM-V 2.6 / MiniCPM-o 2.6 tokenizers (Qwen2's, with its default
# system prompt), used for the tiny test processors and for a 2.6 folder that lacks one. Real
# checkpoints are rendered with the template in their own `tokenizer_config.json`.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

END_OF_TURN = {2.0: "</s>", 2.6: "<|im_end|>"}


def _is_image(part) -> bool:
    if not isinstance(part, dict):
        return not isinstance(part, str)  # `chat()` style: a PIL image in the content list
    return part.get("type") in ("image", "image_url") or "image" in part or "image_url" in part


def content_text(content) -> str:
    """One message's content (a string, or a list of HF parts / strings / images) as `chat()`'s string."""
    if isinstance(content, str):
        return content
    pieces = []
    for part in content:
        if _is_image(part):
            pieces.append(IMAGE_TAG)
        elif isinstance(part, str):
            pieces.append(part)
        elif "text" in part:
            pieces.append(part["text"])
        else:
            raise VlmtuneError(f"MiniCPM-V chat format: unsupported message part {part!r}; use "
                               "{\"type\": \"image\"} or {\"type\": \"text\", \"text\": ...}")
    out = ""
    for i, piece in enumerate(pieces):
        if i and not (out.endswith("\n") or piece.startswith("\n")):
            out += "\n"
        out += piece
    return out


def string_messages(messages: list[dict], version: float) -> list[dict]:
    """`messages` with string contents, checked against what the version's `chat()` accepts."""
    out = []
    for i, message in enumerate(messages):
        role = message.get("role")
        allowed = ("user", "assistant") if version < 2.6 else ("system", "user", "assistant")
        if role not in allowed:
            extra = " (MiniCPM-V 2.0's chat format has no system turn: drop data.system_prompt / the system turn)" \
                if role == "system" else ""
            # a DataError: the pre-flight check lists it against the record (FILE:INDEX) instead of stopping
            raise DataError(f"MiniCPM-V {version} chat format: message {i} has role {role!r}; "
                            f"use one of {', '.join(allowed)}{extra}")
        out.append({"role": role, "content": content_text(message.get("content", ""))})
    return out
