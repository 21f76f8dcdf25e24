from ecomla.evaluation.evaluate import summary_table, format_score
rows = []
for m, s in [("A", {"arc_easy": .6, "piqa": .7, "lambada_openai": .4}), ("B", {"arc_easy": .3, "piqa": .55, "lambada_openai": .1})]:
    for t, v in s.items(): rows.append({"model": m, "task": t, "metric": "acc", "value": v})
cols, table = summary_table(rows, {"A": 100, "B": 25})
for r in table: print({k: format_score(k, v) for k, v in r.items()})
fa = (.6+.7+.4)/3; fb = (.3+.55+.1)/3; ch = (.25+.5+0)/3
print("expected B margin", (fb-ch)/(fa-ch), "avg vs first", fb/fa)
