"""Train a byte-level BPE tokenizer with `tokenizers` and wrap it as a PreTrainedTokenizerFast.

Digits are split one per token before BPE, so numbers are spelled out digit by digit: small
models learn carrying far more easily that way. The result is saved with pad/eos tokens and a
ChatML chat template, so `AutoTokenizer.from_pretrained(final/)` works with no project code.

With `tools=True` (stages.pretrain.tokenizer_tools) the tokenizer also has the tool-call markers
as single tokens and TOOL_CHAT_TEMPLATE: ChatML that shows the offered tools in a system turn
(name and argument names: a tiny model reads no descriptions), writes an assistant's calls as
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` and the results as `tool` turns. It
renders a conversation without tools exactly as CHAT_TEMPLATE does, and is saved with
RESPONSE_TEMPLATE, which transformers' `parse_response` (and so TRL's tool loop) reads calls with.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

EOS = "<|endoftext|>"
PAD = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [PAD, EOS, IM_START, IM_END]
TOOL_CALL, TOOL_CALL_END = "<tool_call>", "</tool_call>"

# any one of these marks a directory that holds a saved tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TOOL_CHAT_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\nTools: ' }}{% for tool in tools %}"
    "{% set function = tool.function if tool.function is defined else tool %}"
    "{{ function.name + '(' + (function.parameters.properties | list | join(', ')) + ')' }}"
    "{% if not loop.last %}{{ ', ' }}{% endif %}{% endfor %}{{ '<|im_end|>\n' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + (message['content'] or '') }}"
    "{% for call in message.tool_calls or [] %}"
    "{% set function = call.function if call.function is defined else call %}"
    "{{ '<tool_call>' + ({'name': function.name, 'arguments': function.arguments if function.arguments is defined else {}}"
    " | tojson) + '</tool_call>' }}"
    "{% endfor %}{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# transformers' response template for TOOL_CHAT_TEMPLATE (tokenizer.parse_response): the text
# before any call is the content, each <tool_call> holds one JSON call
RESPONSE_TEMPLATE = {
    "defaults": {"role": "assistant"},
    "start_anchor": "<|im_start|>assistant\n",
    "fields": {
        "tool_calls": {"open": TOOL_CALL, "close_pattern": r"</tool_call>\s*", "repeats": True, "content": "json",
                       "transform": {"type": "function", "function": "{content}"}},
        "content": {"close_pattern": r"<\|im_end\|>\s*", "content": "text"},
    },
}


def train_tokenizer(texts: list[str], vocab_size: int, tools: bool = False) -> PreTrainedTokenizerFast:
    """A BPE tokenizer of `vocab_size` tokens trained on `texts`; `tools`: with the tool-call
    markers and the chat template that renders tools (module docstring)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = SPECIAL_TOKENS + ([TOOL_CALL, TOOL_CALL_END] if tools else [])
    if vocab_size < len(alphabet) + len(specials):
        raise ValueError(f"tokenizer_vocab_size={vocab_size} is below the byte alphabet + specials ({len(alphabet) + len(specials)})")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=specials[2:],
        model_max_length=4096,
    )
    wrapped.chat_template = TOOL_CHAT_TEMPLATE if tools else CHAT_TEMPLATE
    if tools:
        wrapped.response_template = RESPONSE_TEMPLATE
    return wrapped


def stop_token_ids(tokenizer) -> list[int]:
    """Token ids that end a generation: eos, plus the chat turn end when the tokenizer has one."""
    ids = [tokenizer.eos_token_id]
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id and im_end not in ids:
        ids.append(im_end)
    return [i for i in ids if i is not None]


def load_chat_tokenizer(path: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer saved with a checkpoint, which must carry a chat template (chat-format
    stages render every prompt with it). Raises ValueError naming the fix otherwise."""
    path = Path(path)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(
            f"{path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save the model's tokenizer "
            f"next to its weights (tokenizer.save_pretrained('{path}')), or start from a stage's final/, "
            "which always includes one"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if not tokenizer.chat_template:
        raise ValueError(
            f"the tokenizer in {path} has no chat template, which chat-format training and evaluation need; "
            f"set one and save it (tokenizer.chat_template = ...; tokenizer.save_pretrained('{path}')), "
            "e.g. pipeline.tokenizer.CHAT_TEMPLATE (ChatML), or start from an instruct/chat checkpoint"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def save_tokenizer(tokenizer, directory: Path) -> None:
    """save_pretrained with the padding side the tokenizer was loaded with (default right): a
    stage that pads left to generate (grpo) hands the next stage the tokenizer it was given."""
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = tokenizer.init_kwargs.get("padding_side") or "right"
    try:
        tokenizer.save_pretrained(directory)
    finally:
        tokenizer.padding_side = padding_side
