# fxq's layout move (issue 8, part 8): old module -> new module, for code written against the old layout.
#   sed -i -E -f docs/layout.sed $(git ls-files '*.py' '*.md' '*.toml')
# `from fxq import a, b` lists that mix moved and unmoved modules are left alone; find them with
#   grep -rnE 'from fxq import .*,' --include=*.py .
s/\bfrom fxq import tracer( as [A-Za-z_]+)?( *(#.*)?)$/from fxq.tracing import tracer\1\2/
s/\bfxq\.tracer\b/fxq.tracing.tracer/g
s#\bfxq/tracer\.py\b#fxq/tracing/tracer.py#g
s/\bfrom fxq import _guards( as [A-Za-z_]+)?( *(#.*)?)$/from fxq.tracing import _guards\1\2/
s/\bfxq\._guards\b/fxq.tracing._guards/g
s#\bfxq/_guards\.py\b#fxq/tracing/_guards.py#g
s/\bfrom fxq import _proxy( as [A-Za-z_]+)?( *(#.*)?)$/from fxq.tracing import _proxy\1\2/
s/\bfxq\._proxy\b/fxq.tracing._proxy/g
s#\bfxq/_proxy\.py\b#fxq/tracing/_proxy.py#g
s/\bfrom fxq import graph( as [A-Za-z_]+)?( *(#.*)?)$/from fxq.tracing import graph\1\2/
s/\bfxq\.graph\b/fxq.tracing.graph/g
s#\bfxq/graph\.py\b#fxq/tracing/graph.py#g
s/\bfrom fxq import meta( as [A-Za-z_]+)?( *(#.*)?)$/from fxq.tracing import meta\1\2/
s/\bfxq\.meta\b/fxq.tracing.meta/g
s#\bfxq/meta\.py\b#fxq/tracing/meta.py#g
s/\bfrom fxq import callspec( as [A-Za-z_]+)?( *(#.*)?)$/from fxq.tracing import callspec\1\2/
s/\bfxq\.callspec\b/fxq.tracing.callspec/g
s#\bfxq/callspec\.py\b#fxq/tracing/callspec.py#g
s/\bfrom fxq import inputs( as [A-Za-z_]+)?( *(#.*)?)$/from fxq.tracing import inputs\1\2/
s/\bfxq\.inputs\b/fxq.tracing.inputs/g
s#\bfxq/inputs\.py\b#fxq/tracing/inputs.py#g
s/\bfrom fxq import quantizer( as [A-Za-z_]+)?( *(#.*)?)$/from fxq.quant import quantizer\1\2/
s/\bfxq\.quantizer\b/fxq.quant.quantizer/g
s#\bfxq/quantizer\.py\b#fxq/quant/quantizer.py#g
s/\bfrom fxq import observers( as [A-Za-z_]+)?( *(#.*)?)$/from fxq.quant import observers\1\2/
s/\bfxq\.observers\b/fxq.quant.observers/g
s#\bfxq/observers\.py\b#fxq/quant/observers.py#g
s/\bfrom fxq import freeze( as [A-Za-z_]+)?( *(#.*)?)$/from fxq.quant import freeze\1\2/
s/\bfxq\.freeze\b/fxq.quant.freeze/g
s#\bfxq/freeze\.py\b#fxq/quant/freeze.py#g
s/\bfrom fxq import adaround( as [A-Za-z_]+)?( *(#.*)?)$/from fxq.quant import adaround\1\2/
s/\bfxq\.adaround\b/fxq.quant.adaround/g
s#\bfxq/adaround\.py\b#fxq/quant/adaround.py#g
s/\bfrom fxq import bias_correction( as [A-Za-z_]+)?( *(#.*)?)$/from fxq.quant import bias_correction\1\2/
s/\bfxq\.bias_correction\b/fxq.quant.bias_correction/g
s#\bfxq/bias_correction\.py\b#fxq/quant/bias_correction.py#g
s/\bfrom fxq import ops( as [A-Za-z_]+)?( *(#.*)?)$/from fxq.quant import ops\1\2/
s/\bfxq\.ops\b/fxq.quant.ops/g
s#\bfxq/ops\.py\b#fxq/quant/ops.py#g
s/\bfrom fxq import data( as [A-Za-z_]+)?( *(#.*)?)$/from fxq.eval import data\1\2/
s/\bfxq\.data\b/fxq.eval.data/g
s#\bfxq/data\.py\b#fxq/eval/data.py#g
s/\bfrom fxq import fidelity( as [A-Za-z_]+)?( *(#.*)?)$/from fxq.eval import fidelity\1\2/
s/\bfxq\.fidelity\b/fxq.eval.fidelity/g
s#\bfxq/fidelity\.py\b#fxq/eval/fidelity.py#g
s/\bfrom fxq import images( as [A-Za-z_]+)?( *(#.*)?)$/from fxq.eval import images\1\2/
s/\bfxq\.images\b/fxq.eval.images/g
s#\bfxq/images\.py\b#fxq/eval/images.py#g
s/\bfrom fxq import analysis( as [A-Za-z_]+)?( *(#.*)?)$/from fxq.eval import analysis\1\2/
s/\bfxq\.analysis\b/fxq.eval.analysis/g
s#\bfxq/analysis\.py\b#fxq/eval/analysis.py#g
s/\bfrom fxq import serialize_graph( as [A-Za-z_]+)?( *(#.*)?)$/from fxq.io import serialize_graph\1\2/
s/\bfxq\.serialize_graph\b/fxq.io.serialize_graph/g
s#\bfxq/serialize_graph\.py\b#fxq/io/serialize_graph.py#g
s/\bfrom fxq import serialize_modules( as [A-Za-z_]+)?( *(#.*)?)$/from fxq.io import serialize_modules\1\2/
s/\bfxq\.serialize_modules\b/fxq.io.serialize_modules/g
s#\bfxq/serialize_modules\.py\b#fxq/io/serialize_modules.py#g
s/\bfxq\.mixed_precision\b/fxq.quant.mixed_precision/g
s/\bfrom fxq import mixed_precision\b/from fxq.quant import mixed_precision/g
s#fxq/mixed_precision\.py#fxq/quant/mixed_precision.py#g
