"""The attention call alone, per layer of SmolLM2-135M (9 query heads over 3 key/value heads,
head dim 64), enable_gqa against query heads packed into rows, for 1-16 queries over 96-384
keys, bf16 and float32, torch's default threads; median microseconds of 7 runs.
Prints "q{W} {enable_gqa}/{packed}".    python kernel_widths.py"""
import torch, time, torch.nn.functional as F, statistics
def t(fn, n=200):
    for _ in range(20): fn()
    best=[]
    for r in range(7):
        s=time.perf_counter()
        for _ in range(n//7): fn()
        best.append((time.perf_counter()-s)/(n//7)*1e6)
    return statistics.median(best)
print("threads", torch.get_num_threads())
for dtype in (torch.bfloat16, torch.float32):
  for L in (96, 192, 384):
    row=[]
    for q in (1,2,3,4,5,8,16):
        Kk=torch.randn(1,3,L,64,dtype=dtype); Vk=torch.randn_like(Kk)
        m=torch.rand(1,1,q,L)<0.9; m[...,-1]=True
        Q=torch.randn(1,9,q,64,dtype=dtype)
        g=t(lambda: F.scaled_dot_product_attention(Q,Kk,Vk,attn_mask=m,enable_gqa=True))
        def packed():
            mp=m.repeat(1,1,3,1) if q>1 else m
            return F.scaled_dot_product_attention(Q.reshape(1,3,3*q,64),Kk,Vk,attn_mask=mp).reshape(1,9,q,64)
        p=t(packed)
        row.append(f"q{q} {g:.0f}/{p:.0f}")
    print(str(dtype)[6:], "L", L, " ".join(row), flush=True)
