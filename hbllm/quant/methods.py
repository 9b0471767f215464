"""The registry's entries: one :func:`~hbllm.quant.registry.register` call per method."""
from __future__ import annotations

from .arbllm import arbllm_bits, arbllm_block, arbllm_label, check_arbllm
from .billm import billm_bits, billm_block, check_billm
from .gptq import check_gptq, gptq_label, gptq_loop
from .hbllm import check_hbllm, check_hbllm_shape, hbllm_bits, hbllm_block, hbllm_label
from .pbllm import check_pbllm, check_pbllm_shape, pbllm_bits, pbllm_label, pbllm_loop
from .registry import Method, register
from .rtn import check_rtn, rtn_label, rtn_loop
from .sign import sign_bits, sign_block
from .uniform import uniform_bits

register(Method("none", label=lambda cfg: "fp16", quantizes=False))
register(Method("hbllm", hbllm_label, hbllm_bits, block=hbllm_block, fields={"salient_metric": "l2"},
                check=check_hbllm, check_shape=check_hbllm_shape, packable=True))
register(Method("billm", lambda cfg: "billm", billm_bits, block=billm_block,
                fields={"salient_metric": "l1"}, check=check_billm))
register(Method("sign", lambda cfg: "sign", sign_bits, block=sign_block))
register(Method("rtn", rtn_label, uniform_bits, loop=rtn_loop, fields={"wbits": 4, "groupsize": -1},
                check=check_rtn))
register(Method("gptq", gptq_label, uniform_bits, loop=gptq_loop,
                fields={"wbits": 4, "groupsize": -1, "sym": False, "act_order": False,
                        "static_groups": False},
                check=check_gptq))
register(Method("pbllm", pbllm_label, pbllm_bits, loop=pbllm_loop,
                fields={"low_frac": 0.9, "high_bit": 8, "salient_metric": "hessian", "groupsize": -1},
                check=check_pbllm, check_shape=check_pbllm_shape))
ARB_FIELDS = {"salient_metric": "l1", "arb_iters": 15, "cgb": True, "arb_split_on": "t"}
register(Method("arbllm_x", arbllm_label, arbllm_bits("x"), block=arbllm_block("x"),
                fields={**ARB_FIELDS, "arb_x_iters": 15}, check=check_arbllm, block_hessian=True))
register(Method("arbllm_rc", arbllm_label, arbllm_bits("rc"), block=arbllm_block("rc"),
                fields=ARB_FIELDS, check=check_arbllm, block_hessian=True))
