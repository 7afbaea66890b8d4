# Allocation-heavy Python: builds and drops dicts, lists, strings and tuples. Run with
# PYTHONMALLOC=malloc so that every object goes through malloc (memtrack run sets it).
import sys

n = int(sys.argv[1]) if len(sys.argv) > 1 else 300000
keep = []
for i in range(n):
    d = {"id": i, "name": "item-%d" % i, "tags": [str(i), str(i * 2)], "t": (i, i + 1)}
    keep.append(d)
    if len(keep) > 5000:
        del keep[:2500]
print(len(keep))
