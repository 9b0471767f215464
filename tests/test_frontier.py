"""The accuracy-vs-bits frontier of hbllm-report: Pareto front, families, CSV and plot."""
import pandas as pd

from hbllm.frontier import family, frontier_section, pareto


def test_pareto_front():
    bits = [1.0, 2.0, 2.0, 3.0, 4.0, 3.5]
    ppl = [90.0, 50.0, 60.0, 50.0, 20.0, 10.0]
    assert pareto(bits, ppl) == [True, True, False, False, False, True]


def test_family_is_the_quant_method():
    assert family({"config": {"quant": {"method": "gptq"}}, "method": "gptq_w3g128"}) == "gptq"
    assert family({"config": {"quant": {"method": "none"}}, "method": "fp16"}) == "fp16"


def test_frontier_section_writes_csv_plot_and_the_front(tmp_path):
    rows = [("fp16", "fp16", 32.0, 32.0, 20.0), ("rtn_w3g128", "rtn", 3.0, 3.15, 90.0),
            ("gptq_w3g128", "gptq", 3.0, 3.15, 40.0), ("gptq_w2g128", "gptq", 2.0, 2.15, 300.0),
            ("billm", "billm", 1.06, 3.0, 400.0), ("hbllm_row", "hbllm", 1.05, 3.6, 200.0)]
    df = pd.DataFrame([dict(model="m", method=m, family=f, bits_paper=p, bits_full=b, ppl_wiki=v)
                       for m, f, p, b, v in rows])
    md = "\n".join(frontier_section(df, tmp_path, 8.0))
    csv = pd.read_csv(tmp_path / "frontier.csv").set_index("method")
    assert "fp16" not in csv.index
    assert csv["front_full_wiki"].to_dict() == {"rtn_w3g128": False, "gptq_w3g128": True, "gptq_w2g128": True,
                                                "billm": False, "hbllm_row": False}
    assert csv["front_paper_wiki"]["hbllm_row"] and csv["front_paper_wiki"]["gptq_w3g128"]
    assert "| 2.150 | gptq_w2g128 | gptq |" in md and "| 3.150 | gptq_w3g128 | gptq |" in md
    assert (tmp_path / "frontier_m_wiki.png").stat().st_size > 10_000
