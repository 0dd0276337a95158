"""The end of a peer scenario's report (peers.sh, tls-peers.sh): the failed
runs, and the sink's count of messages against the generator's. Imported
by the scripts' inline Python (`sys.path` gets loadtest/); exits 1 when a
run failed or the counts differ."""
import json
import sys


def finish(failed, sink_log, sent):
    bad = 0
    if failed:
        print(f"\nFAILED runs (not every message accepted; left out of the medians): {len(failed)}")
        for f in failed:
            print(f"  {f}")
        bad = 1
    sink = None
    try:
        for line in open(sink_log):
            if line.startswith("{"):
                sink = json.loads(line)
    except OSError:
        pass
    if sink is None:
        print("sink: no count (its log has no JSON report)")
        bad = 1
    elif sink["messages"] != sent:
        print(f"sink: MISMATCH, it received {sink['messages']} messages, the generator counted {sent} accepted (warm-up included)")
        bad = 1
    else:
        print(f"sink: received {sink['messages']} messages = accepted by the generator (warm-up included)")
    sys.exit(bad)
