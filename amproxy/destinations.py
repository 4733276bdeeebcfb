"""A worker's Carbon destinations: one sender each, and which lines go to which.

Each destination has its own connection, memory buffer, spool subdirectory,
backoff, resend window and dead-letter file, so one that is down or slow
holds only its own lines; the others keep receiving.  Placement is carbon's
(:mod:`amproxy.placement`), remembered per metric name so that the hot path
pays a dictionary lookup per line, not a hash ring walk.
"""

import logging
import os

from .buffer import SPOOL_PREFIX, Spool, SpoolError
from .carbon import CarbonSender
from .deadletter import DeadLetters
from .placement import CACHE_BYTES, CACHE_SIZE, Placement
from .protocol import carbon_payload
from .stats import DESTINATION_COUNTERS, DESTINATION_GAUGES, destination_node

log = logging.getLogger(__name__)


def spool_directory(spool_dir, destinations, destination):
    """Where one destination's spools and dead letters live.

    One destination keeps the layout of earlier versions (the spool directory
    itself), so an upgrade finds what it left; several get a subdirectory each.
    """
    if len(destinations) == 1:
        return spool_dir
    return os.path.join(spool_dir, str(destination))


def stranded_spools(spool_dir, destinations):
    """Spools under ``spool_dir`` that no configured destination will send."""
    if not spool_dir or not os.path.isdir(spool_dir):
        return []
    used = {os.path.abspath(spool_directory(spool_dir, destinations, d)) for d in destinations}
    candidates = [spool_dir] + [os.path.join(spool_dir, name) for name in os.listdir(spool_dir)]
    stranded = []
    for directory in candidates:
        if os.path.abspath(directory) in used or not os.path.isdir(directory):
            continue
        for name in os.listdir(directory):
            spool = os.path.join(directory, name)
            if name.startswith(SPOOL_PREFIX) and os.path.isdir(spool) and any(
                    entry.endswith(".spool") and os.path.getsize(os.path.join(spool, entry))
                    for entry in os.listdir(spool)):
                stranded.append(spool)
    return stranded


class Destinations:
    """What the worker talks to: "the destinations", however many there are."""

    def __init__(self, options, selector, clock, slot):
        destinations = options.carbon_addr
        self.placement = Placement.from_options(options)
        self.senders = []
        for destination in destinations:
            spool = dead_letters = None
            if options.spool_dir:
                directory = spool_directory(options.spool_dir, destinations, destination)
                spool = Spool.of_worker(directory, slot, options.spool_max_bytes)
                dead_letters = DeadLetters(directory)
            self.senders.append(CarbonSender(
                destination, selector, clock, options.buffer_size, spool,
                options.replay_rate, options.resend_window, dead_letters))
        self._batches = [[] for _ in self.senders]
        self._placed = {}  # metric -> what appends a line to its destinations' batches
        self._placed_bytes = 0  # of the names in it

    # -- lines ---------------------------------------------------------------

    def send_datagram(self, sock):
        """A datagram of lines from ``sock`` (the master's self-metrics, unless another
        worker took them first): they go to Carbon as forwarded lines do."""
        try:
            data = sock.recv(1 << 20)
        except (BlockingIOError, InterruptedError):
            return
        if data:
            self.send(data.splitlines())

    def send(self, lines):
        """Queue Carbon lines (``metric value timestamp``, no newline) where they belong."""
        senders = self.senders
        if len(senders) == 1 or self.placement.broadcast:
            payload = carbon_payload(lines)
            for sender in senders:
                sender.enqueue(payload, len(lines))
            return
        placed = self._placed
        for line in lines:
            # partition()[0] is the cheapest way to the name; the lookup gives
            # the append of the batch (or batches) the metric goes to.
            metric = line.partition(b" ")[0]
            try:
                placed[metric](line)
            except KeyError:
                self._place(metric)(line)
        for sender, batch in zip(senders, self._batches):
            if batch:
                sender.enqueue(carbon_payload(batch), len(batch))
                batch.clear()

    def _place(self, metric):
        self._placed_bytes += len(metric)
        if len(self._placed) >= CACHE_SIZE or self._placed_bytes > CACHE_BYTES:
            # Bounded in names and in bytes (names may be 4,000 bytes long):
            # names seldom seen cost a placement again.
            self._placed.clear()
            self._placed_bytes = len(metric)
        appends = [self._batches[i].append for i in self.placement.place(metric)]
        if len(appends) == 1:
            append = appends[0]
        else:
            def append(line):
                for each in appends:
                    each(line)
        self._placed[metric] = append
        return append

    def replay_stranded(self, spool_dir, max_bytes):
        """Place again the lines spooled for another list of destinations (at a worker's start).

        Going from one destination to three, say, leaves lines in spools that
        no sender reads any more.  Each is read, its lines placed by today's
        list, written to those destinations' spools, and only then deleted:
        a crash in between sends some twice, never none.  Another worker
        busy with a spool leaves it to that worker.
        """
        for directory in stranded_spools(spool_dir, self.placement.destinations):
            lines = 0
            try:
                spool = Spool(directory, max_bytes).open(wait=False)
                if spool is None:
                    continue
                try:
                    for data, count in iter(spool.read_chunk, None):
                        self.send(data.splitlines())
                        for sender in self.senders:
                            sender.save_to_spool()  # on disk before the old copy goes
                        spool.release_read()
                        lines += count
                finally:
                    spool.close()
            except SpoolError as e:
                log.error("%s; its lines stay there", e)
            if lines:
                log.warning("placed again the lines spooled for an earlier list of "
                            "destinations", extra={"spool": directory, "lines": lines})

    # -- the senders, together -----------------------------------------------

    def flush(self):
        for sender in self.senders:
            sender.flush()

    def adopt_orphan_spools(self):
        for sender in self.senders:
            sender.adopt_orphan_spools()

    @property
    def full(self):
        """Some destination can hold no more: reading clients must pause (no line is dropped)."""
        return any(sender.full for sender in self.senders)

    @property
    def memory_empty(self):
        return all(sender.memory_empty for sender in self.senders)

    def backlog(self):
        """For the log: which destinations are full, and what all of them hold."""
        return {"carbon": ", ".join(str(s.address) for s in self.senders if s.full),
                "buffered_lines": sum(s.queued_lines for s in self.senders),
                "spooled_bytes": sum(s.spooled_bytes for s in self.senders)}

    def seconds_to_next_write(self, now):
        waits = [w for w in (s.seconds_to_next_write(now) for s in self.senders)
                 if w is not None]
        return min(waits) if waits else None

    def set_live_options(self, options):
        for sender in self.senders:
            sender.replay_rate = options.replay_rate
            sender.window.window = options.resend_window

    def retry_within(self, seconds):
        for sender in self.senders:
            sender.retry_within(seconds)

    def save_to_spool(self, why):
        """Keep what was not sent (see CarbonSender.save_to_spool), and close; log what no
        spool can keep: "``why``, with lines ... they are lost"."""
        for sender in self.senders:
            lines = sender.save_to_spool()
            if lines:
                log.error("%s with lines that Carbon has not taken and no spool to keep them "
                          "in; they are lost", why,
                          extra={"lines": lines, "carbon": str(sender.address)})
        self.close()

    def close(self):
        for sender in self.senders:
            sender.close()
            if sender.spool is not None:
                sender.spool.close()

    # -- self-metrics --------------------------------------------------------

    def counters(self):
        counters = {
            "carbonReconnects": sum(s.reconnects for s in self.senders),
            "droppedLines": sum(s.dropped_lines for s in self.senders),
            "deadLetters": sum(s.dead_letters.count for s in self.senders),
        }
        for sender in self.senders:
            node = destination_node(sender.address)
            for name, value in zip(DESTINATION_COUNTERS, (sender.lines_sent, sender.reconnects)):
                counters["%s.%s" % (node, name)] = value
        return counters

    def gauges(self):
        gauges = {"bufferedLines": sum(s.queued_lines for s in self.senders),
                  "spooledBytes": sum(s.spooled_bytes for s in self.senders)}
        for sender in self.senders:
            node = destination_node(sender.address)
            for name, value in zip(DESTINATION_GAUGES, (sender.queued_lines,
                                                        sender.spooled_bytes)):
                gauges["%s.%s" % (node, name)] = value
        return gauges
