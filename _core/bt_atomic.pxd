# Header-only declarations of the atomics every compiled primitive uses.
# cimported by absolute name (cythonize include_path=["_core"]).
from libc.stdint cimport int64_t

cdef extern from "buttress_atomic.h" nogil:
    int64_t bt_load(int64_t *p)
    void bt_store(int64_t *p, int64_t v)
    bint bt_cas(int64_t *p, int64_t expected, int64_t desired)
    int64_t bt_fetch_add(int64_t *p, int64_t d)
    int64_t bt_exchange(int64_t *p, int64_t v)
    void bt_fence_seq_cst()       # full fence (store-then-load handshakes)
    void bt_fence_after_rmw()     # full fence directly after a bt_cas / bt_fetch_add / bt_exchange
