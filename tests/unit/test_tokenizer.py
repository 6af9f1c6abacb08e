from transformers import AutoTokenizer

from pipeline.tokenizer import IM_END, stop_token_ids, train_tokenizer

TEXTS = ["Q: 47+18-9=?\n47+18=65\n65-9=56\nA: 56\n", "Q: 12-80=?\n12-80=-68\nA: -68\n"] * 50


def test_round_trip_digits_and_save_load(tmp_path):
    tokenizer = train_tokenizer(TEXTS, 300)
    for text in TEXTS[:2] + ["unseen text: ~{}|é 12345"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    # digits are single tokens, so numbers are spelled digit by digit
    pieces = [tokenizer.decode([i]) for i in tokenizer("65-9=56", add_special_tokens=False)["input_ids"]]
    assert [p for p in pieces if p.isdigit()] == ["6", "5", "9", "5", "6"]
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.eos_token == "<|endoftext|>" and loaded.pad_token == "<|pad|>"
    assert loaded.pad_token_id != loaded.eos_token_id
    assert loaded(TEXTS[0])["input_ids"] == tokenizer(TEXTS[0])["input_ids"]
    assert stop_token_ids(loaded) == [loaded.eos_token_id, loaded.convert_tokens_to_ids(IM_END)]


def test_chat_template_renders(tmp_path):
    tokenizer = train_tokenizer(TEXTS, 300)
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    messages = [{"role": "user", "content": "47+18=?"}, {"role": "assistant", "content": "47+18=65\nA: 65"}]
    text = loaded.apply_chat_template(messages, tokenize=False)
    assert text == "<|im_start|>user\n47+18=?<|im_end|>\n<|im_start|>assistant\n47+18=65\nA: 65<|im_end|>\n"
    prompt = loaded.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    ids = loaded(text, add_special_tokens=False)["input_ids"]
    assert ids.count(loaded.convert_tokens_to_ids(IM_END)) == 2  # special tokens stay whole


def calculator(expression: str) -> str:
    """Add and subtract.

    Args:
        expression: integers joined by + and -
    """
    return expression


TOOL_CONVERSATION = [
    {"role": "user", "content": "47+18-9=?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "47+18-9"}}}]},
    {"role": "tool", "name": "calculator", "content": "56"},
    {"role": "assistant", "content": "A: 56"},
]


def test_the_tool_template_renders_calls_results_and_parses_replies(tmp_path):
    from trl.chat_template_utils import is_chat_template_prefix_preserving, supports_tool_calling

    calls = ['{"name": "calculator", "arguments": {"expression": "47+18-9"}}'] * 20
    tokenizer = train_tokenizer(TEXTS + calls, 320, tools=True)
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)  # the chat template and the response template travel with it
    text = loaded.apply_chat_template(TOOL_CONVERSATION, tools=[calculator], tokenize=False)
    assert text == ("<|im_start|>system\nTools: calculator(expression)<|im_end|>\n<|im_start|>user\n47+18-9=?<|im_end|>\n"
                    '<|im_start|>assistant\n<tool_call>{"name": "calculator", "arguments": {"expression": "47+18-9"}}'
                    "</tool_call><|im_end|>\n<|im_start|>tool\n56<|im_end|>\n<|im_start|>assistant\nA: 56<|im_end|>\n")
    plain = train_tokenizer(TEXTS, 300)
    chat = TOOL_CONVERSATION[:1] + [{"role": "assistant", "content": "A: 56"}]
    assert loaded.apply_chat_template(chat, tokenize=False) == plain.apply_chat_template(chat, tokenize=False)
    assert supports_tool_calling(loaded) and is_chat_template_prefix_preserving(loaded)
    ids = loaded(text, add_special_tokens=False)["input_ids"]
    assert ids.count(loaded.convert_tokens_to_ids("<tool_call>")) == 1  # the markers are single tokens
    prefix = loaded.apply_chat_template(TOOL_CONVERSATION[:1], tools=[calculator], tokenize=False, add_generation_prompt=True)
    reply = '<tool_call>{"name": "calculator", "arguments": {"expression": "47+18-9"}}</tool_call><|im_end|>'
    assert loaded.parse_response(reply, prefix=prefix)["tool_calls"] == TOOL_CONVERSATION[1]["tool_calls"]
    assert loaded.parse_response("A: 56<|im_end|>", prefix=prefix) == {"role": "assistant", "content": "A: 56"}
    # without tools=True: the plain ChatML template, which TRL's check refuses for tool use
    assert not supports_tool_calling(plain) and getattr(plain, "response_template", None) is None
