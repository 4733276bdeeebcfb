"""Placement must be carbon's, byte for byte: carbon's own router is the oracle."""

import os
import random
import subprocess

import pytest
from carbon.hashing import ConsistentHashRing, carbonHash
from carbon.routers import ConsistentHashingRouter

from conftest import AMPROXY

from amproxy.placement import (REPLICAS, Destination, Placement, Ring, parse_destination,
                               parse_destinations, ring_position)


class Settings(dict):
    def __getattr__(self, name):
        return self[name]


def carbon_router(destinations, hash_type, replication, diverse):
    router = ConsistentHashingRouter(Settings(
        REPLICATION_FACTOR=replication, DIVERSE_REPLICAS=diverse, ROUTER_HASH_TYPE=hash_type))
    for d in destinations:
        router.addDestination(tuple(d))
    return router


def carbon_places(router, metric):
    """What carbon sends to: the router's destinations, each once, in its order."""
    return list(dict.fromkeys(router.getDestinations(metric)))


def random_names(rng, count):
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789_-"
    unicode_nodes = ["température", "湿度", "датчик", "naïve", "😀", "x\u00a0"[:1]]
    names = []
    for _ in range(count):
        nodes = []
        for _ in range(rng.randint(1, 6)):
            if rng.random() < 0.2:
                nodes.append(rng.choice(unicode_nodes) + str(rng.randint(0, 99)))
            else:
                nodes.append("".join(rng.choice(alphabet)
                                     for _ in range(rng.randint(1, 12))))
        names.append(".".join(nodes))
    return names


def raw_collisions(destinations, hash_type):
    """How many ring positions carbon must move up by one for this set."""
    taken, bumps = set(), 0
    for d in destinations:
        for i in range(REPLICAS):
            key = "%d-%s" % (i, d[2]) if hash_type == "fnv1a_ch" else "%s:%d" % ((d[0], d[2]), i)
            position = carbonHash(key, hash_type)
            while position in taken:
                position += 1
                bumps += 1
            taken.add(position)
    return bumps


def destination_sets(rng, hash_type):
    """Sets with and without instances, several per host, and sets with collisions."""
    sets = [
        [Destination("127.0.0.1", 2003)],
        [Destination("127.0.0.1", 2103, "a"), Destination("127.0.0.1", 2203, "b"),
         Destination("127.0.0.1", 2303, "c")],
        [Destination("carbon1", 2004), Destination("carbon2", 2004), Destination("carbon3", 2004)],
        [Destination("10.0.0.1", 2004, "a"), Destination("10.0.0.1", 2104, "b"),
         Destination("10.0.0.2", 2004, "a"), Destination("10.0.0.2", 2104, "b")],
        [Destination("::1", 2003, "a"), Destination("::1", 2103, "b")],
    ]
    colliding = 0
    while colliding < 4:
        hosts = rng.sample(range(1, 255), rng.randint(2, 5))
        with_instances = rng.random() < 0.5
        candidate = [Destination("192.168.%d.%d" % (rng.randint(0, 9), h), 2004,
                                 chr(ord("a") + n) if with_instances else None)
                     for n, h in enumerate(hosts)]
        if raw_collisions(candidate, hash_type):
            sets.append(candidate)
            colliding += 1
    return sets


@pytest.mark.parametrize("hash_type", ["carbon_ch", "fnv1a_ch"])
def test_placement_is_carbons_for_random_names_sets_replication_and_diversity(hash_type):
    rng = random.Random(20261128)
    names = random_names(rng, 2000)
    sets = destination_sets(rng, hash_type)
    assert sum(1 for s in sets if raw_collisions(s, hash_type)) >= 4
    compared = 0
    for destinations in sets:
        for replication in (1, 2, 3):
            for diverse in (True, False):
                router = carbon_router(destinations, hash_type, replication, diverse)
                placement = Placement(destinations, hash_type=hash_type,
                                      replication_factor=replication, diverse_replicas=diverse)
                for name in names:
                    expected = carbon_places(router, name)
                    assert placement.route(name.encode()) == expected, (
                        name, destinations, replication, diverse)
                    compared += 1
    assert compared == len(names) * len(sets) * 6 >= 100000


@pytest.mark.parametrize("hash_type", ["carbon_ch", "fnv1a_ch"])
def test_the_ring_is_carbons_entry_for_entry(hash_type):
    destinations = [Destination("192.168.0.%d" % h, 2004, "x%d" % h) for h in range(1, 9)]
    ring = Ring(destinations, hash_type)
    theirs = ConsistentHashRing([(d.host, d.instance) for d in destinations],
                                hash_type=hash_type)
    assert list(zip(ring.positions, [ring.nodes[o] for o in ring.owners])) == theirs.ring


def test_ring_positions_match_carbon_for_utf8_and_odd_keys():
    for key in ["a", "température.x", "😀", "a b", "", "x" * 5000]:
        for hash_type in ("carbon_ch", "fnv1a_ch"):
            assert ring_position(key.encode(), hash_type) == carbonHash(key, hash_type)


def test_broadcast_sends_every_metric_everywhere():
    destinations = parse_destinations("a:2003,b:2003")
    placement = Placement(destinations, relay_method="broadcast")
    assert placement.route(b"x.y") == destinations


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:2003", ("127.0.0.1", 2003, None)),
    (" carbon1:2004:a ", ("carbon1", 2004, "a")),
    ("[::1]:2003", ("::1", 2003, None)),
    ("[2001:db8::7]:2004:b", ("2001:db8::7", 2004, "b")),
])
def test_destinations_parse_as_carbon_writes_them(text, expected):
    destination = parse_destination(text)
    assert destination == expected
    assert parse_destination(str(destination)) == destination


@pytest.mark.parametrize("text", [
    "", "carbon1", "carbon1:", ":2003", "carbon1:http", "carbon1:0", "carbon1:65536",
    "carbon1:2003:", "carbon1:2003:a:b", "::1:2003", "[::1]2003", "[::1:2003",
    "car bon:2003", "carbon1:2003:a/b", "carbon1:\u00b2", "carbon1:\u0662\u0660\u0660\u0663",
])
def test_bad_destinations_are_refused_by_name(text):
    with pytest.raises(ValueError, match="is not a destination"):
        parse_destination(text)


def test_the_same_host_and_instance_twice_is_refused_as_carbon_does():
    with pytest.raises(ValueError, match="carbon1:2003 and carbon1:2004 are the same host"):
        parse_destinations("carbon1:2003,carbon1:2004")
    assert len(parse_destinations("carbon1:2003:a,carbon1:2004:b")) == 2


def test_route_command_prints_carbons_destinations_from_flags_env_and_config(tmp_path):
    destinations = "127.0.0.1:2103:a,127.0.0.1:2203:b,10.0.0.5:2003:c,[::1]:2004"
    names = random_names(random.Random(7), 50)
    config = tmp_path / "amproxy.conf"
    config.write_text("carbon-addr = %s\nreplication-factor = 2\n" % destinations)
    env = dict(os.environ, AMPROXY_CONFIG=str(config), AMPROXY_DIVERSE_REPLICAS="false")
    result = subprocess.run([AMPROXY, "route", "--hash-type", "fnv1a_ch"] + names,
                            capture_output=True, text=True, env=env, timeout=30)
    assert result.returncode == 0, result.stderr
    router = carbon_router(parse_destinations(destinations), "fnv1a_ch", 2, False)
    expected = ["%s %s" % (name, " ".join(str(Destination(*d)) for d in carbon_places(router, name)))
                for name in names]
    assert result.stdout.splitlines() == expected
    # Names on standard input, one per line, give the same answer.
    from_stdin = subprocess.run([AMPROXY, "route", "--hash-type", "fnv1a_ch"],
                                input="\n".join(names) + "\n", capture_output=True, text=True,
                                env=env, timeout=30)
    assert from_stdin.stdout == result.stdout


def test_route_names_the_bad_destination():
    result = subprocess.run([AMPROXY, "route", "--carbon-addr", "carbon1:2003,carbon1", "x"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "'carbon1' is not a destination" in result.stderr


def test_settings_that_do_not_do_what_they_seem_are_warned_about():
    def warnings(text, **settings):
        return Placement(parse_destinations(text), **settings).warnings()
    assert warnings("a:2003:x,a:2103:y", replication_factor=2) == [
        "--replication-factor is 2, but each metric can go to only 1 destination (with "
        "--diverse-replicas, one per host)"]
    assert warnings("a:2003:x,a:2103:y", replication_factor=2, diverse_replicas=False) == []
    assert "by instance only" in warnings("a:2003,b:2003", hash_type="fnv1a_ch")[0]
    assert warnings("a:2003:x,b:2003:y", hash_type="fnv1a_ch") == []
    assert warnings("a:2003,b:2003", relay_method="broadcast", replication_factor=3) == []
