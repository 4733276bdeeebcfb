"""Which Carbon destinations a metric goes to: carbon's own consistent-hashing ring.

graphite-web finds a series on the cache that carbon's ring names, so the
placement must be carbon's byte for byte (carbon 1.1.10, ``carbon.hashing``
and ``carbon.routers.ConsistentHashingRouter``), quirks included:

- a node is ``(server, instance)``: the server as written, not the port;
- carbon_ch puts replica ``i`` of a node at the first 16 bits of
  ``md5(str((server, instance)) + ":" + str(i))``; fnv1a_ch at the folded
  FNV-1a hash of ``"%d-%s" % (i, instance)`` (the server is not in it);
- 100 replicas per node; a position already taken moves up by one, in the
  order the destinations are given;
- a metric goes to the first node at or after its own position, then the
  next distinct ones around the ring; with DIVERSE_REPLICAS, one per server.

carbon-c-relay and carbon-relay-ng differ when positions collide.  Pure: no I/O.
"""

import bisect
import hashlib

REPLICAS = 100
HASH_TYPES = ("carbon_ch", "fnv1a_ch")
RELAY_METHODS = ("consistent-hashing", "broadcast")
# Placements remembered per worker, at most this many names of at most this
# many bytes in all; past that the memory is cleared and refilled.
CACHE_SIZE = 50000
CACHE_BYTES = 4 << 20


class Destination(tuple):
    """``(host, port, instance)``; ``str()`` gives ``host:port[:instance]`` as written."""

    __slots__ = ()

    def __new__(cls, host, port, instance=None):
        return tuple.__new__(cls, (host, port, instance))

    host = property(lambda self: self[0])
    port = property(lambda self: self[1])
    instance = property(lambda self: self[2])

    def __str__(self):
        host = "[%s]" % self.host if ":" in self.host else self.host
        text = "%s:%d" % (host, self.port)
        return text if self.instance is None else "%s:%s" % (text, self.instance)


def parse_destination(text):
    """``host:port``, ``host:port:instance`` or ``[v6]:port[:instance]``; ValueError if not."""
    text = text.strip()
    problem = "%r is not a destination such as 127.0.0.1:2003 or carbon1:2003:a" % text
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise ValueError(problem)
        rest = rest[1:]
    else:
        host, _, rest = text.partition(":")
    port, separator, instance = rest.partition(":")
    if (not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) <= 65535
            or (separator and not instance) or ":" in instance
            or any(c.isspace() or c in "[]/" for c in host + instance)):
        raise ValueError(problem)
    return Destination(host, int(port), instance or None)


def parse_destinations(text):
    """A comma-separated list, as carbon's DESTINATIONS; ValueError names the bad one."""
    destinations = [parse_destination(part) for part in str(text).split(",")]
    nodes = {}
    for destination in destinations:
        node = (destination.host, destination.instance)
        if node in nodes:
            # carbon refuses it too: both would be one node of the ring.
            raise ValueError("%s and %s are the same host and instance, one node of carbon's "
                             "ring; give each its own instance (host:port:instance)"
                             % (nodes[node], destination))
        nodes[node] = destination
    return destinations


def fnv1a_32(data):
    value = 0x811c9dc5
    for byte in data:
        value = ((value ^ byte) * 0x01000193) & 0xffffffff
    return value


def ring_position(key, hash_type):
    """carbon.hashing.carbonHash, for UTF-8 bytes."""
    if hash_type == "fnv1a_ch":
        big = fnv1a_32(key)
        return (big >> 16) ^ (big & 0xffff)
    return int.from_bytes(hashlib.md5(key).digest()[:2], "big")


class Ring:
    """carbon.hashing.ConsistentHashRing, built once from the destinations in order."""

    def __init__(self, destinations, hash_type="carbon_ch"):
        self.hash_type = hash_type
        self.nodes = [(d.host, d.instance) for d in destinations]
        taken = set()
        entries = []
        for index, node in enumerate(self.nodes):
            for replica in range(REPLICAS):
                if hash_type == "fnv1a_ch":
                    key = "%d-%s" % (replica, node[1])
                else:
                    key = "%s:%d" % (node, replica)  # str() of the tuple, as carbon
                position = ring_position(key.encode("utf-8"), hash_type)
                while position in taken:
                    position += 1
                taken.add(position)
                entries.append((position, index))
        entries.sort()
        self.positions = [position for position, _ in entries]
        self.owners = [index for _, index in entries]

    def walk(self, metric):
        """Destination indexes in the order carbon's ``get_nodes`` yields them."""
        owners = self.owners
        size = len(owners)
        index = bisect.bisect_left(self.positions, ring_position(metric, self.hash_type)) % size
        last = (index - 1) % size
        seen = set()
        while len(seen) < len(self.nodes) and index != last:
            owner = owners[index]
            if owner not in seen:
                seen.add(owner)
                yield owner
            index = (index + 1) % size


class Placement:
    """Where each metric goes: indexes into the destinations, without repeats.

    ``place(metric)`` takes the metric as UTF-8 bytes.  carbon's router names
    a lone destination twice when replication is above one; carbon sends once
    per destination, and so does this.
    """

    def __init__(self, destinations, relay_method="consistent-hashing",
                 hash_type="carbon_ch", replication_factor=1, diverse_replicas=True):
        self.destinations = list(destinations)
        self.broadcast = relay_method == "broadcast"
        self.ring = Ring(self.destinations, hash_type)
        self.replication_factor = replication_factor
        self.diverse_replicas = diverse_replicas

    @classmethod
    def from_options(cls, options):
        """The placement the server's options (or ``amproxy route``'s) describe."""
        return cls(options.carbon_addr, options.relay_method, options.hash_type,
                   options.replication_factor, options.diverse_replicas)

    def warnings(self):
        """What an operator should hear at start: settings carbon accepts that do not do
        what they seem to."""
        if self.broadcast or len(self.destinations) == 1:
            return []
        found = []
        hosts = {d.host for d in self.destinations} if self.diverse_replicas \
            else self.destinations
        if len(hosts) < self.replication_factor:
            found.append("--replication-factor is %d, but each metric can go to only %d "
                         "destination%s (with --diverse-replicas, one per host)"
                         % (self.replication_factor, len(hosts), "" if len(hosts) == 1 else "s"))
        instances = [d.instance for d in self.destinations]
        if self.ring.hash_type == "fnv1a_ch" and len(set(instances)) < len(instances):
            found.append("with --hash-type fnv1a_ch the ring knows destinations by instance "
                         "only (as carbon's), so destinations without distinct instances "
                         "share positions and one takes most metrics; give each an "
                         "instance (host:port:instance)")
        return found

    def place(self, metric):
        if self.broadcast:
            return tuple(range(len(self.destinations)))
        chosen = []
        if self.diverse_replicas:
            servers = set()
            for index in self.ring.walk(metric):
                server = self.destinations[index].host
                if server in servers:
                    continue
                servers.add(server)
                chosen.append(index)
                if len(servers) >= self.replication_factor:
                    break
        else:
            for count, index in enumerate(self.ring.walk(metric)):
                if count == self.replication_factor:
                    break
                chosen.append(index)
        return tuple(dict.fromkeys(chosen))

    def route(self, metric):
        """The destinations of one metric, for ``amproxy route``."""
        return [self.destinations[i] for i in self.place(metric)]
