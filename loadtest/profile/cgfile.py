"""What the callgrind scripts of this folder share: reading callgrind's
compressed names (`(12) name` the first time, `(12)` after)."""
import re


def name(tok, table):
    """The name `tok` stands for, remembered in `table` the first time."""
    m = re.match(r'\((\d+)\)(?:\s+(.*))?', tok)
    if m:
        if m.group(2):
            table[m.group(1)] = m.group(2)
        return table.get(m.group(1), m.group(1))
    return tok
