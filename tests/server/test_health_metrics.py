"""grpc.health.v1 (overall, per service, per model), reflection, Prometheus metrics, shutdown."""

from __future__ import annotations

import threading
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

import llmopt
from llmopt.server.status import ServerUnavailableError
from tests.server.conftest import CLASSIFIER, DECODER, ENCODER, make_repository, slow_steps

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _check(channel: grpc.Channel, service: str) -> Any:
    return health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=10).status


def test_health_overall_per_service_and_per_model(server: Any) -> None:
    with grpc.insecure_channel(server.address) as channel:
        for service in ("", "llmopt.v1.Llmopt", "inference.GRPCInferenceService", DECODER,
                        ENCODER, CLASSIFIER):
            assert _check(channel, service) == SERVING, service
        with pytest.raises(grpc.RpcError) as info:
            _check(channel, "no-such-model")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_describes_both_services(server: Any) -> None:
    with grpc.insecure_channel(server.address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {"llmopt.v1.Llmopt", "inference.GRPCInferenceService",
                "grpc.health.v1.Health"} <= services
        pool = descriptor_pool.DescriptorPool(database)
        request = pool.FindMessageTypeByName("llmopt.v1.GenerateRequest")
        assert "sampling" in request.fields_by_name
        infer = pool.FindMessageTypeByName("inference.ModelInferRequest")
        assert infer.fields_by_name["raw_input_contents"].number == 7


def test_metrics_over_http(server: Any) -> None:
    with llmopt.Client(server.address) as client:
        client.generate(DECODER, "hello", max_new_tokens=5, ignore_eos=True)
        client.embed(ENCODER, ["hello"])
        with pytest.raises(llmopt.LlmoptError):
            client.generate("nope", "hello")
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    for line in (f'llmopt_requests_total{{code="OK",method="Generate",model="{DECODER}"}}',
                 f'llmopt_requests_total{{code="OK",method="Embed",model="{ENCODER}"}}',
                 'llmopt_requests_total{code="NOT_FOUND",method="Generate",model="_unknown"}',
                 f'llmopt_time_to_first_token_seconds_count{{model="{DECODER}"}}',
                 f'llmopt_decode_tokens_per_second_bucket{{le="+Inf",model="{DECODER}"}}',
                 f'llmopt_request_duration_seconds_bucket{{le="+Inf",method="Embed",model="{ENCODER}"}}',
                 f'llmopt_queue_depth{{model="{DECODER}"}} 0.0',
                 f'llmopt_batch_size{{model="{DECODER}"}} 0.0',
                 f'llmopt_kv_cache_bytes{{model="{DECODER}"}} 0.0',  # idle: the stores are gone
                 f'llmopt_model_ready{{model="{CLASSIFIER}"}} 1.0'):
        assert line in text, line
    assert "nope" not in text  # made-up names never become labels


def test_unload_turns_the_models_health_off(start_server: Any, packages: dict[str, Path],
                                            tmp_path: Path) -> None:
    srv = start_server(make_repository(tmp_path / "repo", packages, [DECODER, ENCODER]))
    with grpc.insecure_channel(srv.address) as channel:
        srv.repository.unload(ENCODER)
        assert _check(channel, ENCODER) == NOT_SERVING
        assert _check(channel, DECODER) == SERVING
        srv.repository.load(ENCODER)
        assert _check(channel, ENCODER) == SERVING


def test_shutdown_drains_and_health_turns_not_serving(start_server: Any,
                                                     packages: dict[str, Path],
                                                     tmp_path: Path) -> None:
    srv = start_server(make_repository(tmp_path / "repo", packages, [DECODER]))
    slow_steps(srv.repository.get(DECODER), 0.01)
    with grpc.insecure_channel(srv.address) as channel, llmopt.Client(srv.address) as client:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=30)
        assert next(watch).status == SERVING
        stream = client.stream(DECODER, "hello", max_new_tokens=60, ignore_eos=True)
        next(stream)
        stopper = threading.Thread(target=srv.stop, args=(30,))
        stopper.start()
        assert next(watch).status == NOT_SERVING
        with pytest.raises(ServerUnavailableError, match="shutting down"):
            client.list_models()  # refused, retryable elsewhere, while the stream goes on
        rest = list(stream)  # the in-flight stream finishes within the grace period
        assert stream.result.stats.generated_tokens == 60 and len(rest) >= 1
        stopper.join(30)
        assert srv.wait(0)
        with pytest.raises(llmopt.LlmoptError):
            client.list_models(timeout=5)


def test_streams_cut_at_the_end_of_the_grace_are_told_the_server_is_shutting_down(
        start_server: Any, packages: dict[str, Path], tmp_path: Path) -> None:
    srv = start_server(make_repository(tmp_path / "repo", packages, [DECODER]))
    slow_steps(srv.repository.get(DECODER), 0.05)  # 200 tokens take 10 s; the grace is 0.3 s
    with llmopt.Client(srv.address) as client:
        stream = client.stream(DECODER, "hello", max_new_tokens=200, ignore_eos=True)
        next(stream)
        stopper = threading.Thread(target=srv.stop, args=(0.3,))
        stopper.start()
        with pytest.raises(ServerUnavailableError, match="shutting down") as info:
            list(stream)
        assert "retry on another replica" in (info.value.fix or "")
        stopper.join(30)
    assert srv.wait(0)
