"""Rendezvous hashing of rooms to replicas (gateway/sharding.py): even, stable across processes, minimal moves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from gateway.config import check_config, load_config
from gateway.errors import ConfigError
from gateway.sharding import Shard, ordinal_from_name, owner

ROOMS = [f"room{i:05d}@contoso.example" for i in range(3000)]


def test_rooms_spread_evenly_over_the_replicas() -> None:
    for count in (2, 3, 5):
        per = Counter(owner(r, count) for r in ROOMS)
        assert set(per) == set(range(count))
        expected = len(ROOMS) / count
        assert all(abs(n - expected) < 0.1 * expected for n in per.values()), per


def test_a_count_change_moves_only_the_rooms_the_new_replica_wins() -> None:
    before = {r: owner(r, 3) for r in ROOMS}
    after = {r: owner(r, 4) for r in ROOMS}
    moved = [r for r in ROOMS if before[r] != after[r]]
    assert all(after[r] == 3 for r in moved)  # nothing moves between the replicas that stay
    assert abs(len(moved) - len(ROOMS) / 4) < 0.1 * len(ROOMS) / 4
    # Scaling down to 2 and back to 3: the rooms of ordinal 2 go to 0 and 1, and exactly they come back.
    down = {r: owner(r, 2) for r in ROOMS}
    assert [r for r in ROOMS if down[r] != before[r]] == [r for r in ROOMS if before[r] == 2]
    assert {r: owner(r, 3) for r in ROOMS} == before


def test_the_owner_is_the_same_in_every_process_whatever_its_hash_seed() -> None:
    rooms = ROOMS[:200]
    code = ("import json, sys; from gateway.sharding import owner; "
            "print(json.dumps([owner(r, 3) for r in json.loads(sys.stdin.read())]))")
    seen = []
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], input=json.dumps(rooms), capture_output=True, text=True,
                             check=True, env={**os.environ, "PYTHONHASHSEED": seed}, timeout=60)
        seen.append(json.loads(out.stdout))
    assert seen[0] == seen[1] == [owner(r, 3) for r in rooms]


PINNED = [0, 0, 2, 2, 1, 0, 1, 1]


def test_the_owner_ignores_case_and_is_pinned() -> None:
    # Pinned values: the hub and every gateway version must agree, so the function never changes silently.
    assert [owner(f"room{i}@contoso.example", 3) for i in range(8)] == PINNED
    assert owner("Room1@Contoso.Example", 3) == owner("room1@contoso.example", 3)
    assert owner("anything@x.example", 1) == 0


def test_the_ordinal_comes_from_the_pod_name() -> None:
    assert ordinal_from_name("gateway-2") == 2
    assert ordinal_from_name("my-release-gateway-10") == 10
    assert ordinal_from_name("gateway") is None


def test_a_shard_refuses_an_ordinal_outside_the_count() -> None:
    with pytest.raises(ValueError, match="between 0 and 2"):
        Shard(3, 3)
    with pytest.raises(ValueError, match="count must be between 1"):
        Shard(0, 0)
    assert Shard(0, 1).owns("any@x.example")
    owned = [r for r in ROOMS if Shard(1, 3).owns(r)]
    assert owned == [r for r in ROOMS if owner(r, 3) == 1]


# -- the configuration ----------------------------------------------------------------------------------------------
BASE_ENV = {"GATEWAY_EXCHANGE__EWS_URL": "https://mail.contoso.com/EWS/Exchange.asmx",
            "GATEWAY_EXCHANGE__USERNAME": "svc@contoso.com", "GATEWAY_ROOMS__MAILBOXES": "room1@contoso.com"}


def test_one_replica_by_default_and_the_count_from_the_environment() -> None:
    assert load_config(None, env=BASE_ENV).replicas.shard(BASE_ENV) == Shard(0, 1)
    env = {**BASE_ENV, "GATEWAY_REPLICAS__COUNT": "3", "POD_NAME": "gateway-2"}
    assert load_config(None, env=env).replicas.shard(env) == Shard(2, 3)
    env = {**BASE_ENV, "GATEWAY_REPLICAS__COUNT": "3", "GATEWAY_REPLICAS__ORDINAL": "1", "HOSTNAME": "gateway-2"}
    assert load_config(None, env=env).replicas.shard(env) == Shard(1, 3)  # configured wins over the pod's name


def test_a_replica_without_an_ordinal_is_told_how_to_give_it_one() -> None:
    env = {**BASE_ENV, "GATEWAY_REPLICAS__COUNT": "3", "HOSTNAME": "laptop"}
    with pytest.raises(ConfigError, match="ordinal is unknown") as e:
        load_config(None, env=env).replicas.shard(env)
    assert e.value.key == "replica_ordinal_unknown" and "GATEWAY_REPLICAS__ORDINAL" in e.value.remedy
    env = {**BASE_ENV, "GATEWAY_REPLICAS__COUNT": "2", "POD_NAME": "gateway-2"}
    with pytest.raises(ConfigError, match="not below replicas\\.count"):
        load_config(None, env=env).replicas.shard(env)


def test_bad_replica_settings_are_refused_with_the_fix() -> None:
    _, problems = check_config(None, {**BASE_ENV, "GATEWAY_REPLICAS__COUNT": "2", "GATEWAY_REPLICAS__ORDINAL": "2"})
    assert any("replicas.ordinal" in str(p) and "below replicas.count (2)" in str(p) for p in problems), problems
    _, problems = check_config(None, {**BASE_ENV, "GATEWAY_REPLICAS__PEER_URL": "http://gateway-0:8088"})
    assert any("{ordinal}" in str(p) for p in problems), problems
    _, problems = check_config(None, {**BASE_ENV, "GATEWAY_REPLICAS__COUNT": "0"})
    assert any("replicas.count" in str(p) for p in problems), problems
