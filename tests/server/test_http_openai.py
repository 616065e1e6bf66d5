"""The OpenAI-compatible routes through the real ``openai`` SDK against a real server."""

from __future__ import annotations

import base64
import time
from typing import Any

import numpy as np
import openai
import pytest

from llmopt.runtime.sampling import SamplingParams
from tests.server.conftest import CLASSIFIER, DECODER, ENCODER, openai_client, sample

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]


@pytest.fixture
def oai(server: Any) -> openai.OpenAI:
    return openai_client(server)


def test_chat_greedy_equals_in_process(oai: openai.OpenAI, generator: Any) -> None:
    expected = generator.chat(MESSAGES, SamplingParams(max_new_tokens=12))
    reply = oai.chat.completions.create(model=DECODER, messages=MESSAGES,  # type: ignore[arg-type]
                                        temperature=0, max_tokens=12)
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.text
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == expected.stats.prompt_tokens
    assert reply.usage.completion_tokens == len(expected.token_ids)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert choice.finish_reason in ("stop", "length")
    assert reply.object == "chat.completion" and reply.model == DECODER


def test_a_chats_next_turn_reports_its_prompt_as_cached(oai: openai.OpenAI, server: Any,
                                                        generator: Any) -> None:
    """The second turn resends the first (system prompt, question, answer): the prefix cache
    holds it, ``usage.prompt_tokens_details.cached_tokens`` says so, and the answer is the
    in-process one on the whole conversation."""
    system = {"role": "system", "content": "you are a careful assistant . answer in short "
              "sentences , be polite and never say more than you know . " * 2}
    turn = [system, {"role": "user", "content": "what is the weather today ?"}]
    first = oai.chat.completions.create(model=DECODER, messages=turn,  # type: ignore[arg-type]
                                        temperature=0, max_tokens=10)
    assert first.choices[0].message.content is not None
    turn += [{"role": "assistant", "content": first.choices[0].message.content},
             {"role": "user", "content": "and tomorrow ?"}]
    before = sample(server, "llmopt_prompt_cached_tokens_total", {"model": DECODER})
    second = oai.chat.completions.create(model=DECODER, messages=turn,  # type: ignore[arg-type]
                                         temperature=0, max_tokens=10)
    assert first.usage is not None and second.usage is not None
    details = second.usage.prompt_tokens_details
    assert details is not None and details.cached_tokens is not None
    assert first.usage.prompt_tokens <= details.cached_tokens < second.usage.prompt_tokens
    assert second.choices[0].message.content == generator.chat(
        turn, SamplingParams(max_new_tokens=10)).text
    after = sample(server, "llmopt_prompt_cached_tokens_total", {"model": DECODER})
    assert after - before == details.cached_tokens


def test_prompt_lookup_streams_the_same_answer_in_fewer_steps(
        oai: openai.OpenAI, server: Any, generator: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """``prompt_lookup`` (an extension field, as vLLM's ``ignore_eos``): the served request
    drafts while it runs alone. The tiny model repeats nothing of its prompt, so the drafter
    here knows the answer; what counts is that confirmed drafts stream the same text and are
    counted on ``/metrics``."""
    from llmopt.runtime import generator as generator_module

    expected = generator.chat(MESSAGES, SamplingParams(max_new_tokens=16, ignore_eos=True))
    prompt = expected.stats.prompt_tokens
    monkeypatch.setattr(generator_module, "prompt_lookup",
                        lambda tokens, count: expected.token_ids[len(tokens) - prompt:][:count])
    before = sample(server, "llmopt_draft_accepted_tokens_total", {"model": DECODER})
    stream = oai.chat.completions.create(
        model=DECODER, messages=MESSAGES, temperature=0, max_tokens=16,  # type: ignore[arg-type]
        stream=True, extra_body={"ignore_eos": True, "prompt_lookup": 4})
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == expected.text
    accepted = sample(server, "llmopt_draft_accepted_tokens_total", {"model": DECODER}) - before
    assert len(expected.token_ids) // 2 < accepted < len(expected.token_ids)
    with pytest.raises(openai.BadRequestError, match="prompt_lookup must be an integer"):
        oai.chat.completions.create(model=DECODER, messages=MESSAGES,  # type: ignore[arg-type]
                                    extra_body={"prompt_lookup": 8})


def test_drafts_of_the_models_own_prompt_lookup_are_counted_in_usage(
        packages: dict[str, Any], start_server: Any, generator: Any, tmp_path: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A model served with ``prompt_lookup`` in its llmopt-serve.yaml drafts for requests that
    ask for nothing: ``usage.completion_tokens_details`` counts those drafts too."""
    from llmopt.runtime import generator as generator_module
    from llmopt.server import ServerConfig
    from tests.server.conftest import make_repository

    expected = generator.chat(MESSAGES, SamplingParams(max_new_tokens=16, ignore_eos=True))
    prompt = expected.stats.prompt_tokens
    monkeypatch.setattr(generator_module, "prompt_lookup",
                        lambda tokens, count: expected.token_ids[len(tokens) - prompt:][:count])
    repo = make_repository(tmp_path / "repo", packages, [DECODER],
                           {DECODER: "prompt_lookup: 4\n"})
    oai = openai_client(start_server(repo, ServerConfig(http_port=0)))
    reply = oai.chat.completions.create(model=DECODER, messages=MESSAGES,  # type: ignore[arg-type]
                                        temperature=0, max_tokens=16,
                                        extra_body={"ignore_eos": True})
    assert reply.choices[0].message.content == expected.text
    assert reply.usage is not None and reply.usage.completion_tokens_details is not None
    accepted = reply.usage.completion_tokens_details.accepted_prediction_tokens
    assert accepted is not None and len(expected.token_ids) // 2 < accepted


def test_a_prediction_is_drafted_from_and_counted_as_openai_does(oai: openai.OpenAI,
                                                                  generator: Any) -> None:
    """OpenAI's Predicted Outputs through the SDK's own ``prediction`` argument: given the
    answer's text, the same answer, most of it from confirmed drafts, counted in
    ``usage.completion_tokens_details``; a malformed prediction is a 400 naming the field."""
    expected = generator.chat(MESSAGES, SamplingParams(max_new_tokens=16, ignore_eos=True))
    reply = oai.chat.completions.create(
        model=DECODER, messages=MESSAGES, temperature=0, max_tokens=16,  # type: ignore[arg-type]
        prediction={"type": "content", "content": [{"type": "text", "text": expected.text}]},
        extra_body={"ignore_eos": True})
    assert reply.choices[0].message.content == expected.text
    assert reply.usage is not None and reply.usage.completion_tokens_details is not None
    details = reply.usage.completion_tokens_details
    assert details.accepted_prediction_tokens is not None
    assert details.accepted_prediction_tokens > len(expected.token_ids) // 2
    assert details.rejected_prediction_tokens is not None
    plain = oai.chat.completions.create(model=DECODER, messages=MESSAGES,  # type: ignore[arg-type]
                                        temperature=0, max_tokens=4)
    assert plain.usage is not None and plain.usage.completion_tokens_details is None
    with pytest.raises(openai.BadRequestError, match="prediction") as bad:
        oai.chat.completions.create(model=DECODER, messages=MESSAGES,  # type: ignore[arg-type]
                                    prediction={"type": "code", "content": "x"})  # type: ignore[typeddict-item]
    assert bad.value.body["param"] == "prediction"  # type: ignore[index]


def test_routes_are_counted_in_the_shared_metrics(oai: openai.OpenAI, server: Any) -> None:
    labels = {"method": "models.list", "model": "", "code": "200"}
    before = sample(server, "llmopt_requests_total", labels)
    oai.models.list()
    # recorded when the response has gone out, so possibly just after the client has it
    until = time.monotonic() + 5
    while sample(server, "llmopt_requests_total", labels) < before + 1 and time.monotonic() < until:
        time.sleep(0.01)
    assert sample(server, "llmopt_requests_total", labels) == before + 1
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="nope", messages=MESSAGES)  # type: ignore[arg-type]
    labels = {"method": "chat.completions", "model": "_unknown", "code": "404"}
    until = time.monotonic() + 5
    while sample(server, "llmopt_requests_total", labels) < 1 and time.monotonic() < until:
        time.sleep(0.01)
    assert sample(server, "llmopt_requests_total", {"method": "chat.completions",
                                                     "model": "_unknown", "code": "404"}) >= 1


def test_streamed_deltas_concatenate_to_the_whole_answer(oai: openai.OpenAI) -> None:
    whole = oai.chat.completions.create(model=DECODER, messages=MESSAGES,  # type: ignore[arg-type]
                                        temperature=0, max_completion_tokens=16)
    stream = oai.chat.completions.create(model=DECODER, messages=MESSAGES,  # type: ignore[arg-type]
                                         temperature=0, max_completion_tokens=16, stream=True,
                                         stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason and not any(finishes[:-1])
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_route_and_n_choices(oai: openai.OpenAI, generator: Any) -> None:
    expected = generator.generate("the quick brown fox", max_new_tokens=10)
    reply = oai.completions.create(model=DECODER, prompt="the quick brown fox", temperature=0,
                                   max_tokens=10)
    assert reply.choices[0].text == expected.text
    sampled = oai.completions.create(model=DECODER, prompt=["one two", "three four"], n=2,
                                     max_tokens=8, temperature=1.0, seed=5)
    assert [c.index for c in sampled.choices] == [0, 1, 2, 3]
    again = oai.completions.create(model=DECODER, prompt=["one two", "three four"], n=2,
                                   max_tokens=8, temperature=1.0, seed=5)
    assert [c.text for c in again.choices] == [c.text for c in sampled.choices]  # seeded


def test_streamed_completion(oai: openai.OpenAI) -> None:
    whole = oai.completions.create(model=DECODER, prompt="hello world", temperature=0,
                                   max_tokens=12)
    parts = [c.choices[0].text for c in oai.completions.create(
        model=DECODER, prompt="hello world", temperature=0, max_tokens=12, stream=True)
        if c.choices]
    assert "".join(parts) == whole.choices[0].text


def test_logprobs_match_the_raw_logits(oai: openai.OpenAI, generator: Any) -> None:
    reply = oai.chat.completions.create(model=DECODER, messages=MESSAGES,  # type: ignore[arg-type]
                                        temperature=0, max_tokens=6, logprobs=True,
                                        top_logprobs=3)
    content = reply.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == reply.usage.completion_tokens  # type: ignore
    for entry in content:
        assert len(entry.top_logprobs) == 3
        best = entry.top_logprobs[0]
        assert entry.token == best.token and entry.logprob == pytest.approx(best.logprob)  # greedy
        assert sorted((t.logprob for t in entry.top_logprobs), reverse=True) == [
            t.logprob for t in entry.top_logprobs]
    # the first token's logprob, recomputed in-process from the prompt's logits
    ids = generator.encode(MESSAGES, chat=True)
    direct = generator.generate(ids, SamplingParams(max_new_tokens=1, logprobs=0,
                                                    ignore_eos=True))
    assert direct.logprobs is not None
    assert content[0].logprob == pytest.approx(direct.logprobs[0].logprob, abs=1e-5)


def test_streamed_chat_logprobs_equal_the_whole_replys(oai: openai.OpenAI) -> None:
    asked: dict[str, Any] = {"model": DECODER, "messages": MESSAGES, "temperature": 0,
                             "max_tokens": 12, "logprobs": True, "top_logprobs": 2}
    reply = oai.chat.completions.create(**asked)
    whole = reply.choices[0]
    chunks = [c for c in oai.chat.completions.create(**asked, stream=True) if c.choices]
    streamed = [entry for c in chunks if c.choices[0].logprobs
                for entry in c.choices[0].logprobs.content or []]
    assert whole.logprobs is not None and whole.logprobs.content
    assert len(streamed) == reply.usage.completion_tokens  # type: ignore[union-attr]
    assert [e.model_dump() for e in streamed] == [e.model_dump()
                                                  for e in whole.logprobs.content]
    # each token's logprob goes out with the text it made, not all at the end
    text_chunks = [c for c in chunks if c.choices[0].delta.content]
    assert all(c.choices[0].logprobs and c.choices[0].logprobs.content for c in text_chunks)


def test_streamed_completion_logprobs_equal_the_whole_replys(oai: openai.OpenAI) -> None:
    asked: dict[str, Any] = {"model": DECODER, "prompt": "one two three", "temperature": 0,
                             "max_tokens": 10, "logprobs": 3}
    whole = oai.completions.create(**asked).choices[0].logprobs
    assert whole is not None
    joined: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                    "text_offset": []}
    for chunk in oai.completions.create(**asked, stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            for key, values in joined.items():
                values.extend(getattr(chunk.choices[0].logprobs, key))
    assert joined == {key: getattr(whole, key) for key in joined}  # offsets run on, too


def test_penalties_change_greedy_output(oai: openai.OpenAI) -> None:
    def text(**extra: Any) -> str:
        reply = oai.completions.create(model=DECODER, prompt="one two", temperature=0,
                                       max_tokens=24, **extra)
        return reply.choices[0].text

    plain = text()
    assert text(frequency_penalty=2.0) != plain or text(presence_penalty=2.0) != plain


def test_embeddings_float_and_base64_equal_in_process(oai: openai.OpenAI, embedder: Any) -> None:
    texts = ["a first sentence", "and another one"]
    expected = embedder.embed(texts)
    floats = oai.embeddings.create(model=ENCODER, input=texts, encoding_format="float")
    got = np.array([d.embedding for d in floats.data], dtype=np.float32)
    cosine = (got * expected).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(
        expected, axis=-1)
    assert np.allclose(cosine, 1.0, atol=1e-5)
    raw = oai.embeddings.with_raw_response.create(model=ENCODER, input=texts,
                                                  encoding_format="base64").http_response.json()
    decoded = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), "<f4")
                        for d in raw["data"]])
    assert np.array_equal(decoded, got)
    assert floats.usage.prompt_tokens > 0


def test_models_list_and_get(oai: openai.OpenAI) -> None:
    names = {m.id for m in oai.models.list()}
    assert names == {DECODER, ENCODER, CLASSIFIER}
    assert oai.models.retrieve(ENCODER).id == ENCODER
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("no-such-model")


def test_json_schema_responses_parse_and_validate(byte_level_oai: openai.OpenAI) -> None:
    import json

    import jsonschema

    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    for index in range(10):
        reply = byte_level_oai.chat.completions.create(
            model="bytes", messages=[{"role": "user", "content": f"person number {index}"}],
            max_tokens=64, temperature=0.8, seed=index,
            response_format={"type": "json_schema",
                             "json_schema": {"name": "person", "schema": schema}})
        assert reply.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(reply.choices[0].message.content or ""), schema)


def test_a_required_tool_call_comes_back_as_tool_calls(byte_level_oai: openai.OpenAI) -> None:
    import json

    import jsonschema

    parameters = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                  "required": ["city"], "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": parameters}}]
    reply = byte_level_oai.chat.completions.create(
        model="bytes", messages=MESSAGES, max_tokens=128, temperature=0,  # type: ignore[arg-type]
        tools=tools, tool_choice="required")  # type: ignore[arg-type]
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.type == "function" and call.function.name == "get_weather"  # type: ignore[union-attr]
    jsonschema.validate(json.loads(call.function.arguments), parameters)  # type: ignore[union-attr]


def test_an_invalid_schema_is_a_400_and_the_server_goes_on(byte_level_oai: openai.OpenAI
                                                            ) -> None:
    with pytest.raises(openai.BadRequestError):
        byte_level_oai.chat.completions.create(
            model="bytes", messages=MESSAGES,  # type: ignore[arg-type]
            response_format={"type": "json_schema",
                             "json_schema": {"name": "bad", "schema": {"type": "no-such-type"}}})
    reply = byte_level_oai.chat.completions.create(
        model="bytes", messages=MESSAGES, max_tokens=4)  # type: ignore[arg-type]
    assert reply.choices[0].message.content is not None


@pytest.mark.real_model
def test_smollm2_chat_over_http_equals_in_process(smollm2_package: Any, tmp_path: Any) -> None:
    import llmopt
    from llmopt.server import ServerConfig, create_server

    question = [{"role": "user", "content": "What is the capital of France?"}]
    expected = llmopt.load(smollm2_package, ["cpu"]).chat(question, max_new_tokens=24)
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "smollm2").symlink_to(smollm2_package, target_is_directory=True)
    srv, _ = create_server(repo, "127.0.0.1:0", ServerConfig(http_port=0))
    with srv:
        client = openai.OpenAI(base_url=srv.http_url + "/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model="smollm2", messages=question,  # type: ignore
                                               temperature=0, max_tokens=24)
    assert reply.choices[0].message.content == expected.text
    assert "Paris" in expected.text
