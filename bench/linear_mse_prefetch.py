"""The C++ linear_mse kernel with and without its software prefetch of each next row block
(csrc/linear_mse.cpp), forward + gradients, interleaved in one process: medians (and minima) of
25 calls each, on shapes whose x is larger than the L2, where fastml/ops/linear_mse/cpp_impl.py
times the two ways for each shape class. "gain" is the prefetching kernel's time over the other's.

    python bench/linear_mse_prefetch.py
"""
import torch, time, statistics
from fastml.ops.linear_mse import cpp_impl
torch.manual_seed(0)
for (n,d,o) in [(65536,256,1),(65536,256,8),(60000,784,10),(16384,1024,4)]:
    x=torch.randn(n,d); y=torch.randn(n,o); w=torch.randn(o,d)*0.01; b=torch.zeros(o)
    fs={"prefetch":lambda: cpp_impl._forward(x,w,b,y,"mean",True,True,False,True),
        "no-prefetch":lambda: cpp_impl._forward(x,w,b,y,"mean",True,True,False,False)}
    for f in fs.values():
        for _ in range(5): f()
    res={k:[] for k in fs}
    for r in range(25):
        for k,f in fs.items():
            t0=time.perf_counter(); f(); res[k].append(time.perf_counter()-t0)
    a,bb=statistics.median(res["prefetch"]),statistics.median(res["no-prefetch"])
    print((n,d,o), f"prefetch {a*1e3:.2f} ms  no-prefetch {bb*1e3:.2f} ms  gain {a/bb:.3f}x  (min {min(res['prefetch'])*1e3:.2f} / {min(res['no-prefetch'])*1e3:.2f})")
