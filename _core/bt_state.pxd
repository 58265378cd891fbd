# The breaker state word: (generation:40 | half-open permits in flight:20 | prepare:1 | state:3) in ONE
# int64, so a transition and the issue of a half-open permit are each a single compare-and-swap and a
# permit can never be issued across a transition. Every transition starts a new generation.
#
# A transition is claim, prepare, publish:
#   claim    one CAS (expect_state, expect_gen) -> same word with the PREPARE bit: exactly one racer wins;
#            nothing else can change a word while its PREPARE bit is set (every CAS expects it clear);
#   prepare  the winner alone writes what the new generation needs (its timestamps, its windows);
#   publish  one store of (new_state, generation + 1, no permits).
# So a reader of generation g never sees a half-prepared generation, and a value meant for generation g
# can never be stored after generation g + 2 began (the old "compute, then store into the slot chosen by
# parity" could). Timestamps are (generation, value) stamps; a reader checks the generation it expects.
from libc.stdint cimport int64_t
from bt_atomic cimport bt_load, bt_cas, bt_store

cdef enum:
    ST_CLOSED = 0
    ST_OPEN = 1
    ST_HALF_OPEN = 2
    ST_FORCED_OPEN = 3
    ST_DISABLED = 4
    ST_METRICS_ONLY = 5
    ST_PREP = 8
    ST_FLIGHT_SHIFT = 4
    ST_GEN_SHIFT = 24
    ST_MAX_FLIGHT = 0xFFFFF

cdef struct stamp_t:
    int64_t gen          # the generation `value` belongs to; -1 while being written or never written
    int64_t value

cdef struct state_t:
    int64_t word
    stamp_t since[2]     # ns when generation g began: since[g & 1], tagged with g


cdef inline int st_state(int64_t w) noexcept nogil:
    return <int>(w & 7)

cdef inline bint st_prep(int64_t w) noexcept nogil:
    return (w & ST_PREP) != 0

cdef inline int64_t st_flight(int64_t w) noexcept nogil:
    return (w >> ST_FLIGHT_SHIFT) & ST_MAX_FLIGHT

cdef inline int64_t st_gen(int64_t w) noexcept nogil:
    return w >> ST_GEN_SHIFT


cdef inline void st_stamp_write(stamp_t *p, int64_t gen, int64_t value) noexcept nogil:
    """Only the owner of the transition into `gen` writes p (so writers never overlap)."""
    bt_store(&p.gen, -1)
    bt_store(&p.value, value)
    bt_store(&p.gen, gen)

cdef inline bint st_stamp_read(stamp_t *p, int64_t gen, int64_t *out) noexcept nogil:
    """The value stamped for `gen`; False when p holds another generation (or is being rewritten)."""
    cdef int64_t v
    if gen < 0 or bt_load(&p.gen) != gen:
        return False
    v = bt_load(&p.value)
    if bt_load(&p.gen) != gen:
        return False
    out[0] = v
    return True


cdef inline bint st_claim(state_t *s, int expect_state, int64_t expect_gen) noexcept nogil:
    """Claim the move out of (expect_state, expect_gen): True for exactly one racer."""
    cdef int64_t w
    while True:
        w = bt_load(&s.word)
        if (w & 0xF) != expect_state or st_gen(w) != expect_gen:
            return False
        if bt_cas(&s.word, w, w | ST_PREP):
            return True

cdef inline int64_t st_claim_word(state_t *s, int expect_state, int64_t expect_gen) noexcept nogil:
    """st_claim returning the claimed word (PREP set), or -1 when another racer won."""
    cdef int64_t w
    while True:
        w = bt_load(&s.word)
        if (w & 0xF) != expect_state or st_gen(w) != expect_gen:
            return -1
        if bt_cas(&s.word, w, w | ST_PREP):
            return w | ST_PREP

cdef inline void st_publish(state_t *s, int new_state, int64_t gen) noexcept nogil:
    """End a claimed transition: (new_state, gen) with no half-open permits out."""
    bt_store(&s.word, (gen << ST_GEN_SHIFT) | new_state)

cdef inline bint st_publish_claimed(state_t *s, int64_t claimed, int new_state, int64_t gen) noexcept nogil:
    """End the transition claimed as word `claimed` (its PREP bit set): one CAS, so in words shared between
    processes a claim taken over from a stalled (killed) preparer is published once. False: taken over."""
    return bt_cas(&s.word, claimed, (gen << ST_GEN_SHIFT) | new_state)


cdef inline int64_t st_transition(state_t *s, int expect_state, int64_t expect_gen, int new_state,
                                  int64_t now) noexcept nogil:
    """Move (expect_state, expect_gen) -> new_state at generation + 1. Returns the new generation,
    or -1 if the word no longer holds (expect_state, expect_gen): exactly one racer wins."""
    cdef int64_t gen = expect_gen + 1
    if not st_claim(s, expect_state, expect_gen):
        return -1
    st_stamp_write(&s.since[gen & 1], gen, now)
    st_publish(s, new_state, gen)
    return gen

cdef inline bint st_try_flight(state_t *s, int64_t gen, int64_t limit) noexcept nogil:
    """Take a half-open permit of generation gen if fewer than limit are out."""
    cdef int64_t w
    if limit > ST_MAX_FLIGHT:
        limit = ST_MAX_FLIGHT       # the field's capacity: never carry into the generation
    while True:
        w = bt_load(&s.word)
        if (w & 0xF) != ST_HALF_OPEN or st_gen(w) != gen or st_flight(w) >= limit:
            return False
        if bt_cas(&s.word, w, w + (1 << ST_FLIGHT_SHIFT)):
            return True

cdef inline bint st_return_flight(state_t *s, int64_t gen) noexcept nogil:
    """Give back a half-open permit of generation gen (no-op for an older generation)."""
    cdef int64_t w
    while True:
        w = bt_load(&s.word)
        if (w & 0xF) != ST_HALF_OPEN or st_gen(w) != gen or st_flight(w) == 0:
            return False
        if bt_cas(&s.word, w, w - (1 << ST_FLIGHT_SHIFT)):
            return True
