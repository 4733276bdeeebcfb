"""Graphite-style metric patterns for the auth file, compiled once per load.

Applied per dotted node: ``*`` matches anything within one node, ``?`` one
character, ``[abc]`` and ``[a-z]`` a character class (``[!a]`` negates it),
``{a,b}`` either alternative.  A trailing ``.**`` (our own extension) matches
one or more further nodes.  Nothing matches across a dot except ``.**``.
"""

import re

GLOB_CHARS = re.compile(r"[*?\[\]{}]")


class PatternError(ValueError):
    pass


def _translate_node(node, pattern):
    """A regex for one node of ``pattern``, matching no dot."""
    out = []
    i = 0
    while i < len(node):
        c = node[i]
        if c == "*":
            out.append("[^.]*")
        elif c == "?":
            out.append("[^.]")
        elif c == "[":
            end = node.find("]", i + 2 if node[i + 1:i + 2] in ("!", "^") else i + 1)
            if end < 0:
                raise PatternError("unclosed [ in %r" % pattern)
            body = node[i + 1:end]
            negate = body[:1] in ("!", "^")
            if negate:
                body = body[1:]
            if not body:
                raise PatternError("empty [] in %r" % pattern)
            body = body.replace("\\", "\\\\").replace("^", "\\^").replace("[", "\\[")
            out.append("[^.%s]" % body if negate else "(?!\\.)[%s]" % body)
            i = end
        elif c == "{":
            end = node.find("}", i)
            if end < 0:
                raise PatternError("unclosed { in %r" % pattern)
            body = node[i + 1:end]
            if "{" in body or "[" in body:
                raise PatternError("nested braces or classes in {} in %r" % pattern)
            out.append("(?:%s)" % "|".join(_translate_node(alt, pattern)
                                           for alt in body.split(",")))
            i = end
        elif c in "]}":
            raise PatternError("unmatched %s in %r" % (c, pattern))
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def translate(pattern):
    """The regex (text) for one pattern; raise PatternError if it is malformed."""
    nodes = pattern.split(".")
    tail = ""
    if nodes[-1] == "**":
        nodes.pop()
        tail = r"(?:\.[^.]+)+"
        if not nodes:
            raise PatternError("%r needs at least one node before .**" % pattern)
    for node in nodes:
        if not node:
            raise PatternError("empty node in %r" % pattern)
        if "**" in node:
            raise PatternError("** is only allowed as the last node, in %r" % pattern)
    return r"\.".join(_translate_node(node, pattern) for node in nodes) + tail


def compile_patterns(patterns):
    """One compiled matcher (bytes) for several patterns: ``matcher(metric)`` -> bool."""
    regex = re.compile(("(?:%s)\\Z" % "|".join(translate(p) for p in patterns)).encode())
    match = regex.match
    return lambda metric: match(metric) is not None
