"""The torch backend's prefix cache: the same answers as without it, a later chat turn reusing the
earlier prompt (its image included), other pictures never sharing blocks, eviction under the byte
budget, M-RoPE families left out, and the cache written to disk and read back."""

import pytest

from edgelmm import EdgelmmError, ModelSpec, Request, SamplingParams, load
from edgelmm.backends.cache_keys import prompt_keys
from edgelmm.backends.prefix_cache import PrefixCache
from tests.tiny_models import make_image, save_tiny

GREEDY = SamplingParams(max_new_tokens=6)


@pytest.fixture(scope="module")
def llava_path(tmp_path_factory):
    return save_tiny("llava", tmp_path_factory.mktemp("llava") / "model")


def chat(image, *turns):
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": turns[0]}]}]
    for answer, question in zip(turns[1::2], turns[2::2]):
        messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": question}]
    return Request(messages=messages)


def test_later_turns_reuse_the_earlier_prompt_and_answer_the_same(llava_path):
    plain = load(ModelSpec(path=str(llava_path), device="cpu"))
    cached = load(ModelSpec(path=str(llava_path), device="cpu", options={"prefix_cache_mb": 16}))
    image = make_image()
    first = chat(image, "What color is the circle?")
    answers = {}
    for name, backend in (("plain", plain), ("cached", cached)):
        one = backend.generate([first], GREEDY)[0]
        two = backend.generate([chat(image, "What color is the circle?", one.text, "How many shapes?")], GREEDY)[0]
        answers[name] = (one.token_ids, two.token_ids)
    assert answers["plain"] == answers["cached"]
    stats = cached.prefix_cache.stats()
    assert stats["hits"] == 1 and stats["misses"] == 1
    assert stats["hit_tokens"] == len(plain.prompt_token_ids(first))  # the whole first prompt, image and all


def test_a_text_rest_skips_the_family_forward_and_an_image_rest_does_not(llava_path):
    backend = load(ModelSpec(path=str(llava_path), device="cpu", options={"prefix_cache_mb": 16}))
    image = make_image()
    one = backend.generate([chat(image, "What color is the circle?")], GREEDY)[0]
    calls: list[int] = []
    hook = backend.model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        backend.generate([chat(image, "What color is the circle?", one.text, "How many shapes?")], GREEDY)
        text_rest = len(calls)
        again = chat(image, "What color is the circle?", one.text, "And here?")
        again.messages[-1]["content"] = [{"type": "image", "image": make_image(seed=3)}, {"type": "text", "text": "And here?"}]
        backend.generate([again], GREEDY)  # the cached head ends before the new picture
    finally:
        hook.remove()
    assert backend.prefix_cache.stats()["hits"] == 2
    assert text_rest == 0 and len(calls) > 0


def test_another_picture_shares_only_what_comes_before_it(llava_path):
    backend = load(ModelSpec(path=str(llava_path), device="cpu", options={"prefix_cache_mb": 16}))
    backend.generate([chat(make_image(seed=1), "What color is the circle?")], GREEDY)
    ids = backend.prompt_token_ids(chat(make_image(seed=2), "What color is the circle?"))
    backend.generate([chat(make_image(seed=2), "What color is the circle?")], GREEDY)
    first_image = ids.index(backend.adapter.image_token_id)
    assert backend.prefix_cache.hit_tokens <= first_image


def test_keys_name_images_by_content():
    a, b = make_image(seed=1), make_image(seed=2)
    mask = [False, True, True, False]
    assert prompt_keys([1, 9, 9, 2], mask, [a]) == prompt_keys([1, 9, 9, 2], mask, [a.copy()])
    assert prompt_keys([1, 9, 9, 2], mask, [a]) != prompt_keys([1, 9, 9, 2], mask, [b])


def test_eviction_keeps_the_budget(llava_path):
    backend = load(ModelSpec(path=str(llava_path), device="cpu", options={"prefix_cache_mb": 0.02}))
    for seed in range(4):
        backend.generate([chat(make_image(seed=seed), "What color is the circle?")], GREEDY)
    cache = backend.prefix_cache
    assert cache.evictions > 0 and cache.nbytes <= cache.budget


def test_mrope_families_are_left_out(tmp_path):
    path = save_tiny("qwen2_vl", tmp_path / "model")
    backend = load(ModelSpec(path=str(path), device="cpu", options={"prefix_cache_mb": 16}))
    assert backend.prefix_cache is None


def test_saved_and_read_back(llava_path, tmp_path):
    file = tmp_path / "cache.safetensors"
    spec = ModelSpec(path=str(llava_path), device="cpu", options={"prefix_cache_mb": 16, "prefix_cache_file": str(file)})
    image = make_image()
    backend = load(spec)
    one = backend.generate([chat(image, "What color is the circle?")], GREEDY)[0]
    held = backend.prefix_cache.stats()["blocks"]
    backend.close()  # written on close
    again = load(spec)
    assert again.prefix_cache.stats()["blocks"] == held
    two = again.generate([chat(image, "What color is the circle?", one.text, "How many shapes?")], GREEDY)[0]
    assert again.prefix_cache.hits == 1 and two.token_ids
    file.write_bytes(b"not a cache")
    with pytest.raises(EdgelmmError, match="cannot read the prefix cache"):
        PrefixCache(2**20).load(file)
