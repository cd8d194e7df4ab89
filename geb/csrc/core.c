/* geb's native decode core: the thread pool, the decode step, and the choice of kernels.
 *
 * geb_decode() runs one whole decode step (embedding, every layer, the final norm and the head) for
 * the first B sequences of a slot KV cache. The calling thread and `threads - 1` persistent workers
 * run the step together: workers are woken once per step (they spin briefly, then sleep on a
 * condition variable) and meet at a spin-then-yield barrier between ops. Matrix products split the
 * weight's output rows between threads; per-sequence ops (norms, activation quantization) split the
 * sequences; attention splits (sequence, key/value head) pairs. Every output is computed by exactly
 * one thread in a fixed order, so results depend neither on the thread count nor on the batch.
 *
 * Kernels (kernels.inc, compiled per ISA) are chosen once from cpuid: the best of AVX512-BF16,
 * AVX512-VNNI, AVX-512, AVX-VNNI, AVX2 and portable C that this CPU runs; geb_select_isa() forces a
 * lower one (GEB_ISA in Python). Called from Python through ctypes (geb/infer/native.py); the module
 * init below only makes this file an importable extension, `geb._native`.
 */
#define _GNU_SOURCE
#include <Python.h>

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "geb_native.h"

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define GEB_X86 1
#include <cpuid.h>
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#else
#define GEB_X86 0
#define cpu_relax() ((void)0)
#endif

/* ---- instruction sets ---------------------------------------------------------------------------- */
typedef struct {
  const char *name;
  void (*fill)(GebKernels *);
  int (*supported)(void);
} IsaVariant;

#if GEB_X86
static uint64_t xgetbv0(void) {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return ((uint64_t)edx << 32) | eax;
}
/* cpuid bits, with the OS's consent to save the registers (xgetbv); read once */
static struct { int ready, avx2, avxvnni, avx512, vnni512, bf16512; } F;

static void cpu_bits(void) {
  unsigned a, b, c, d;
  if (F.ready) return;
  F.ready = 1;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return;
  const int fma = (c >> 12) & 1, osxsave = (c >> 27) & 1, avx = (c >> 28) & 1, f16c = (c >> 29) & 1;
  if (!osxsave || !avx || __get_cpuid_max(0, NULL) < 7) return;
  const uint64_t xcr0 = xgetbv0();
  const int ymm_ok = (xcr0 & 0x6) == 0x6, zmm_ok = (xcr0 & 0xe6) == 0xe6;
  __cpuid_count(7, 0, a, b, c, d);
  const int has_avx2 = (b >> 5) & 1, f = (b >> 16) & 1, dq = (b >> 17) & 1, bw = (b >> 30) & 1, vl = (b >> 31) & 1;
  const int vnni = (c >> 11) & 1;
  unsigned a1, b1, c1, d1;
  __cpuid_count(7, 1, a1, b1, c1, d1);
  const int avx_vnni = (a1 >> 4) & 1, bf16 = (a1 >> 5) & 1;
  F.avx2 = ymm_ok && has_avx2 && fma && f16c;
  F.avxvnni = F.avx2 && avx_vnni;
  F.avx512 = F.avx2 && zmm_ok && f && dq && bw && vl;
  F.vnni512 = F.avx512 && vnni;
  F.bf16512 = F.vnni512 && bf16;
}
#define HAS(field) \
  __attribute__((unused)) static int has_##field(void) { cpu_bits(); return F.field; }
HAS(avx2)
HAS(avxvnni)
HAS(avx512)
HAS(vnni512)
HAS(bf16512)
#endif
static int always(void) { return 1; }

/* best first; setup.py defines GEB_HAVE_<VARIANT> for each variant its compiler built */
static const IsaVariant VARIANTS[] = {
#if GEB_X86 && defined(GEB_HAVE_AVX512BF16)
    {"avx512bf16", geb_kernels_avx512bf16, has_bf16512},
#endif
#if GEB_X86 && defined(GEB_HAVE_AVX512VNNI)
    {"avx512vnni", geb_kernels_avx512vnni, has_vnni512},
#endif
#if GEB_X86 && defined(GEB_HAVE_AVX512)
    {"avx512", geb_kernels_avx512, has_avx512},
#endif
#if GEB_X86 && defined(GEB_HAVE_AVXVNNI)
    {"avxvnni", geb_kernels_avxvnni, has_avxvnni},
#endif
#if GEB_X86 && defined(GEB_HAVE_AVX2)
    {"avx2", geb_kernels_avx2, has_avx2},
#endif
    {"generic", geb_kernels_generic, always},
};
#define N_VARIANTS ((int)(sizeof VARIANTS / sizeof VARIANTS[0]))

static GebKernels K;
static int K_ready = 0;
static pthread_mutex_t K_mu = PTHREAD_MUTEX_INITIALIZER;

static const GebKernels *kernels(void) {
  if (!K_ready) {
    pthread_mutex_lock(&K_mu);
    if (!K_ready) {
      for (int i = 0; i < N_VARIANTS; i++)
        if (VARIANTS[i].supported()) {
          VARIANTS[i].fill(&K);
          break;
        }
      K_ready = 1;
    }
    pthread_mutex_unlock(&K_mu);
  }
  return &K;
}

int geb_abi_version(void) { return GEB_ABI_VERSION; }

const char *geb_isa_name(void) { return kernels()->name; }

/* the variants this CPU runs, best first, comma-separated */
const char *geb_isa_supported(void) {
  static char buf[256];
  buf[0] = 0;
  for (int i = 0; i < N_VARIANTS; i++)
    if (VARIANTS[i].supported()) {
      if (buf[0]) strcat(buf, ",");
      strcat(buf, VARIANTS[i].name);
    }
  return buf;
}

/* 0: selected; -1: no such variant; -2: this CPU cannot run it */
int geb_select_isa(const char *name) {
  for (int i = 0; i < N_VARIANTS; i++)
    if (strcmp(VARIANTS[i].name, name) == 0) {
      if (!VARIANTS[i].supported()) return -2;
      pthread_mutex_lock(&K_mu);
      VARIANTS[i].fill(&K);
      K_ready = 1;
      pthread_mutex_unlock(&K_mu);
      return 0;
    }
  return -1;
}

/* ---- thread pool --------------------------------------------------------------------------------- */
#define MAX_THREADS 256
typedef void (*pool_task)(void *arg, int tid, int nth);

static struct {
  pthread_mutex_t run_mu; /* one step at a time */
  pthread_mutex_t mu;
  pthread_cond_t cv;
  pthread_t th[MAX_THREADS];
  int want, nth, started;
  pid_t pid;
  unsigned start_gen;
  _Atomic unsigned gen;
  _Atomic int sleepers, done, quit;
  _Atomic int bar_count;
  _Atomic unsigned bar_gen;
  pool_task fn;
  void *arg;
} P = {.run_mu = PTHREAD_MUTEX_INITIALIZER, .mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Spin on *flag while it equals `seen`; after `spin_s` seconds yield the core each round (a busy
 * machine's other processes then run) and, if `sleep` is set, sleep on the pool's condition variable. */
static unsigned wait_change(_Atomic unsigned *flag, unsigned seen, double spin_s, int sleep) {
  unsigned v;
  int n = 0;
  double t0 = 0;
  while ((v = atomic_load_explicit(flag, memory_order_acquire)) == seen) {
    cpu_relax();
    if ((++n & 255) == 0) {
      double t = now_s();
      if (t0 == 0) t0 = t;
      else if (t - t0 > spin_s) {
        if (!sleep) {
          sched_yield();
          continue;
        }
        pthread_mutex_lock(&P.mu);
        atomic_fetch_add(&P.sleepers, 1);
        while (atomic_load(flag) == seen) pthread_cond_wait(&P.cv, &P.mu);
        atomic_fetch_sub(&P.sleepers, 1);
        pthread_mutex_unlock(&P.mu);
      }
    }
  }
  return v;
}

static void *worker(void *p) {
  const int tid = (int)(intptr_t)p;
  unsigned seen = P.start_gen;
  for (;;) {
    seen = wait_change(&P.gen, seen, 2e-4, 1);
    if (atomic_load(&P.quit)) return NULL;
    P.fn(P.arg, tid, P.nth);
    atomic_fetch_add_explicit(&P.done, 1, memory_order_release);
  }
}

static void pool_stop(void) {
  if (P.started == 0) return;
  atomic_store(&P.quit, 1);
  atomic_fetch_add(&P.gen, 1);
  pthread_mutex_lock(&P.mu);
  pthread_cond_broadcast(&P.cv);
  pthread_mutex_unlock(&P.mu);
  for (int i = 1; i <= P.started; i++) pthread_join(P.th[i], NULL);
  P.started = 0;
  atomic_store(&P.quit, 0);
}

static int pool_start(int nth) {
  P.start_gen = atomic_load(&P.gen);
  P.nth = 1;
  for (int i = 1; i < nth; i++) {
    if (pthread_create(&P.th[i], NULL, worker, (void *)(intptr_t)i) != 0) break;
    P.started = i;
  }
  P.nth = P.started + 1;
  return P.nth;
}

static void atfork_child(void) {
  /* the parent's workers do not exist in a forked child: start afresh on the next step */
  pthread_mutex_init(&P.run_mu, NULL);
  pthread_mutex_init(&P.mu, NULL);
  pthread_cond_init(&P.cv, NULL);
  P.started = 0;
  P.nth = 1;
  atomic_store(&P.sleepers, 0);
  atomic_store(&P.quit, 0);
  P.pid = getpid();
}

static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;
static void register_atfork(void) { pthread_atfork(NULL, NULL, atfork_child); }

void geb_set_threads(int n) {
  pthread_once(&atfork_once, register_atfork);
  pthread_mutex_lock(&P.run_mu);
  P.want = n < 1 ? 1 : (n > MAX_THREADS ? MAX_THREADS : n);
  pthread_mutex_unlock(&P.run_mu);
}

int geb_get_threads(void) { return P.want > 0 ? P.want : 1; }

static void pool_barrier(int nth) {
  if (nth <= 1) return;
  unsigned g = atomic_load(&P.bar_gen);
  if (atomic_fetch_add(&P.bar_count, 1) == nth - 1) {
    atomic_store(&P.bar_count, 0);
    atomic_fetch_add_explicit(&P.bar_gen, 1, memory_order_release);
    return;
  }
  wait_change(&P.bar_gen, g, 5e-5, 0);
}

/* Run fn(arg, tid, nth) on every thread of the pool (the caller is thread 0) and wait for all. */
static void pool_run(pool_task fn, void *arg) {
  pthread_once(&atfork_once, register_atfork);
  pthread_mutex_lock(&P.run_mu);
  const int want = P.want > 0 ? P.want : 1;
  if (P.pid != getpid()) {
    P.started = 0;
    P.pid = getpid();
  }
  if (P.started + 1 != want) {
    pool_stop();
    pool_start(want);
  }
  const int nth = P.started + 1;
  P.nth = nth;
  P.fn = fn;
  P.arg = arg;
  atomic_store(&P.done, 0);
  atomic_store(&P.bar_count, 0);
  if (nth > 1) {
    atomic_fetch_add_explicit(&P.gen, 1, memory_order_release);
    if (atomic_load(&P.sleepers) > 0) {
      pthread_mutex_lock(&P.mu);
      pthread_cond_broadcast(&P.cv);
      pthread_mutex_unlock(&P.mu);
    }
  }
  fn(arg, 0, nth);
  int n = 0;
  while (atomic_load_explicit(&P.done, memory_order_acquire) != nth - 1)
    if (++n < 4096) cpu_relax();
    else sched_yield();
  pthread_mutex_unlock(&P.run_mu);
}

static inline void split(int64_t n, int tid, int nth, int64_t *r0, int64_t *r1) {
  *r0 = n * tid / nth;
  *r1 = n * (tid + 1) / nth;
}

/* ---- the model ----------------------------------------------------------------------------------- */
typedef struct {
  int64_t n_layer, d_model, n_head, n_kv_head, head_dim, ffn_hidden, vocab, rotary_dims, rope_interleaved;
  float norm_eps, attn_scale;
} GebConfig;

typedef struct {
  const float *attn_norm, *ffn_norm;
  GebMat wqkv, wo, wgu, wdown;
} GebLayer;

typedef struct {
  int32_t kind, _pad;
  const void *w;
  const float *scale;
} GebEmb;

typedef struct {
  GebConfig c;
  GebLayer *layers;
  GebEmb emb;
  GebMat head;
  const float *norm, *cos, *sin;
  int64_t rope_len;
  float *kc, *vc;
  int64_t slots, max_len;
  /* scratch for up to `slots` sequences */
  float *x, *xf, *qkv, *y, *h;
  uint16_t *xb;
  int8_t *xq;
  float *xd, *xs;
  int64_t ldf, ldq, ldg;
  float *tscr;
  int64_t tscr_each, tscr_threads;
} GebModel;

GebModel *geb_model_new(const GebConfig *c) {
  GebModel *m = calloc(1, sizeof *m);
  if (!m) return NULL;
  m->c = *c;
  m->layers = calloc(c->n_layer, sizeof(GebLayer));
  if (!m->layers) {
    free(m);
    return NULL;
  }
  return m;
}

static void free_scratch(GebModel *m) {
  free(m->x); free(m->xf); free(m->qkv); free(m->y); free(m->h); free(m->xb); free(m->xq);
  free(m->xd); free(m->xs); free(m->tscr);
  m->x = m->xf = m->qkv = m->y = m->h = m->xd = m->xs = m->tscr = NULL;
  m->xb = NULL;
  m->xq = NULL;
  m->tscr_threads = 0;
}

void geb_model_free(GebModel *m) {
  if (!m) return;
  free_scratch(m);
  free(m->layers);
  free(m);
}

int geb_model_set_layer(GebModel *m, int64_t i, const GebLayer *l) {
  if (i < 0 || i >= m->c.n_layer) return -1;
  m->layers[i] = *l;
  return 0;
}

int geb_model_set_io(GebModel *m, const GebEmb *emb, const GebMat *head, const float *norm, const float *cos,
                     const float *sin, int64_t rope_len) {
  m->emb = *emb;
  m->head = *head;
  m->norm = norm;
  m->cos = cos;
  m->sin = sin;
  m->rope_len = rope_len;
  return 0;
}

static int64_t round_up(int64_t v, int64_t to) { return (v + to - 1) / to * to; }

static int64_t max_k(const GebModel *m) {
  const GebConfig *c = &m->c;
  int64_t k = c->d_model;
  if (c->n_head * c->head_dim > k) k = c->n_head * c->head_dim;
  if (c->ffn_hidden > k) k = c->ffn_hidden;
  for (int64_t i = 0; i < c->n_layer; i++) {
    const GebMat *ws[4] = {&m->layers[i].wqkv, &m->layers[i].wo, &m->layers[i].wgu, &m->layers[i].wdown};
    for (int j = 0; j < 4; j++)
      if (ws[j]->kp > k) k = ws[j]->kp;
  }
  if (m->head.kp > k) k = m->head.kp;
  return round_up(k, 64);
}

/* The cache the step reads and writes: FP32 [n_layer, slots, n_kv_head, max_len, head_dim]. */
int geb_model_set_cache(GebModel *m, float *kc, float *vc, int64_t slots, int64_t max_len) {
  const GebConfig *c = &m->c;
  if (slots < 1 || max_len < 1) return -1;
  free_scratch(m);
  m->kc = kc;
  m->vc = vc;
  m->slots = slots;
  m->max_len = max_len;
  const int64_t k = max_k(m), qkv = (c->n_head + 2 * c->n_kv_head) * c->head_dim;
  m->ldf = k;
  m->ldq = k;
  m->ldg = round_up(k / 32, 8) + 8;
  m->x = malloc(sizeof(float) * slots * c->d_model);
  m->xf = malloc(sizeof(float) * slots * m->ldf);
  m->xb = malloc(sizeof(uint16_t) * slots * m->ldf);
  m->xq = malloc(slots * m->ldq);
  m->xd = calloc(slots * m->ldg, sizeof(float));
  m->xs = calloc(slots * m->ldg, sizeof(float));
  m->qkv = malloc(sizeof(float) * slots * qkv);
  m->y = malloc(sizeof(float) * slots * c->n_head * c->head_dim);
  m->h = malloc(sizeof(float) * slots * c->ffn_hidden);
  if (!m->x || !m->xf || !m->xb || !m->xq || !m->xd || !m->xs || !m->qkv || !m->y || !m->h) {
    free_scratch(m);
    return -2;
  }
  return 0;
}

/* ---- one decode step ----------------------------------------------------------------------------- */
#define GU_CHUNK 32 /* gate/up rows computed together before SiLU(gate) * up */

typedef struct {
  GebModel *m;
  const GebKernels *k;
  int64_t b;
  const int64_t *tokens, *pos;
  float *logits;
} Step;

/* a view of rows r0..r0+n of a weight */
static GebMat mat_rows(const GebMat *w, int64_t r0, int64_t n) {
  GebMat v = *w;
  v.n = n;
  switch (w->kind) {
    case GEB_F32: v.w = (const float *)w->w + r0 * w->k; break;
    case GEB_BF16: v.w = (const uint16_t *)w->w + r0 * w->k; break;
    case GEB_Q8: v.w = (const int8_t *)w->w + r0 * w->k; v.scale = w->scale + r0; break;
    case GEB_Q4:
      v.w = (const uint8_t *)w->w + r0 * (w->kp / 2);
      v.s = w->s + r0 * (w->kp / 32);
      v.z = w->z + r0 * (w->kp / 32);
      break;
  }
  if (w->bias) v.bias = w->bias + r0;
  return v;
}

/* Prepare row b of activations xf (k floats) for the weight kind that reads them next. */
static void prep_row(const Step *st, const GebMat *w, const float *xf, int64_t ldx, int64_t b) {
  GebModel *m = st->m;
  const float *x = xf + b * ldx;
  if (w->kind == GEB_Q8 || w->kind == GEB_Q4) {
    st->k->quant_q8(x, w->k, w->kind == GEB_Q4 ? w->kp : w->k, m->xq + b * m->ldq, m->xd + b * m->ldg,
                    m->xs + b * m->ldg);
  } else if (w->kind == GEB_BF16 && st->k->bf16_act) {
    uint16_t *o = m->xb + b * m->ldf;
    for (int64_t i = 0; i < w->k; i++) o[i] = geb_f32_to_bf16(x[i]);
  }
}

static GebAct act_of(const Step *st, const float *xf, int64_t ldx) {
  GebModel *m = st->m;
  /* prep_row writes BF16 activations with stride ldf whatever the float rows' stride */
  GebAct a = {xf, m->xb, m->xq, m->xd, m->xs, ldx, m->ldf, m->ldq, m->ldg};
  return a;
}

static void rmsnorm(const float *x, const float *w, int64_t n, float eps, float *out, const GebKernels *k) {
  const float ms = k->dot(x, x, n) / (float)n;
  const float r = 1.0f / sqrtf(ms + eps);
  for (int64_t i = 0; i < n; i++) out[i] = x[i] * r * w[i];
}

static void rope(float *v, const float *cs, const float *sn, int64_t rd, int interleaved) {
  const int64_t h = rd / 2;
  if (interleaved) {
    for (int64_t i = 0; i < h; i++) {
      const float a = v[2 * i], b = v[2 * i + 1];
      v[2 * i] = a * cs[i] - b * sn[i];
      v[2 * i + 1] = b * cs[i] + a * sn[i];
    }
  } else {
    for (int64_t i = 0; i < h; i++) {
      const float a = v[i], b = v[i + h];
      v[i] = a * cs[i] - b * sn[i];
      v[i + h] = b * cs[i] + a * sn[i];
    }
  }
}

static void embed_row(const GebModel *m, int64_t tok, float *out) {
  const int64_t d = m->c.d_model;
  switch (m->emb.kind) {
    case GEB_F32: memcpy(out, (const float *)m->emb.w + tok * d, d * sizeof(float)); break;
    case GEB_BF16: {
      const uint16_t *r = (const uint16_t *)m->emb.w + tok * d;
      for (int64_t i = 0; i < d; i++) out[i] = geb_bf16_to_f32(r[i]);
      break;
    }
    default: {
      const int8_t *r = (const int8_t *)m->emb.w + tok * d;
      const float s = m->emb.scale[tok];
      for (int64_t i = 0; i < d; i++) out[i] = (float)r[i] * s;
    }
  }
}

/* norm (optional) and preparation of every sequence's row for weight w, sequences split by thread */
static void prep_all(const Step *st, const GebMat *w, const float *src, int64_t lds, const float *normw,
                     int tid, int nth) {
  GebModel *m = st->m;
  for (int64_t b = tid; b < st->b; b += nth) {
    const float *x = src + b * lds;
    if (normw) {
      rmsnorm(x, normw, m->c.d_model, m->c.norm_eps, m->xf + b * m->ldf, st->k);
      prep_row(st, w, m->xf, m->ldf, b);
    } else {
      prep_row(st, w, src, lds, b);
    }
  }
}

static void matmul_part(const Step *st, const GebMat *w, const GebAct *a, float *y, int64_t ldy, int acc,
                        int tid, int nth) {
  int64_t r0, r1;
  split(w->n, tid, nth, &r0, &r1);
  if (r1 > r0) st->k->mm(w, a, (int)st->b, y, ldy, acc, r0, r1);
}

static void attention_part(const Step *st, int64_t layer, int tid, int nth) {
  GebModel *m = st->m;
  const GebConfig *c = &m->c;
  const int64_t D = c->head_dim, nh = c->n_head, kvh = c->n_kv_head, grp = nh / kvh, rd = c->rotary_dims;
  const int64_t qkv_ld = (nh + 2 * kvh) * D;
  float *scores = m->tscr + tid * m->tscr_each;
  for (int64_t u = tid; u < st->b * kvh; u += nth) {
    const int64_t b = u / kvh, h = u % kvh, p = st->pos[b];
    float *row = m->qkv + b * qkv_ld;
    const float *cs = m->cos + p * (rd / 2), *sn = m->sin + p * (rd / 2);
    for (int64_t g = 0; g < grp; g++) rope(row + (h * grp + g) * D, cs, sn, rd, (int)c->rope_interleaved);
    float *kr = row + (nh + h) * D, *vr = row + (nh + kvh + h) * D;
    rope(kr, cs, sn, rd, (int)c->rope_interleaved);
    const int64_t base = (((layer * m->slots + b) * kvh + h) * m->max_len) * D;
    memcpy(m->kc + base + p * D, kr, D * sizeof(float));
    memcpy(m->vc + base + p * D, vr, D * sizeof(float));
    st->k->attn(row + h * grp * D, (int)grp, m->kc + base, m->vc + base, p + 1, D, c->attn_scale, scores,
                m->y + b * nh * D + h * grp * D);
  }
}

static inline float silu(float g) { return g / (1.0f + expf(-g)); }

static void swiglu_part(const Step *st, const GebMat *w, const GebAct *a, int tid, int nth) {
  GebModel *m = st->m;
  const int64_t F = m->c.ffn_hidden, B = st->b;
  float *gs = m->tscr + tid * m->tscr_each, *us = gs + B * GU_CHUNK;
  int64_t i0, i1;
  split(F, tid, nth, &i0, &i1);
  for (int64_t i = i0; i < i1; i += GU_CHUNK) {
    const int64_t n = i + GU_CHUNK < i1 ? GU_CHUNK : i1 - i;
    GebMat gv = mat_rows(w, i, n), uv = mat_rows(w, F + i, n);
    st->k->mm(&gv, a, (int)B, gs, GU_CHUNK, 0, 0, n);
    st->k->mm(&uv, a, (int)B, us, GU_CHUNK, 0, 0, n);
    for (int64_t b = 0; b < B; b++)
      for (int64_t j = 0; j < n; j++) m->h[b * F + i + j] = silu(gs[b * GU_CHUNK + j]) * us[b * GU_CHUNK + j];
  }
}

static void step_task(void *arg, int tid, int nth) {
  Step *st = arg;
  GebModel *m = st->m;
  const GebConfig *c = &m->c;
  const int64_t d = c->d_model, qd = c->n_head * c->head_dim, qkv_ld = (c->n_head + 2 * c->n_kv_head) * c->head_dim;
  for (int64_t b = tid; b < st->b; b += nth) embed_row(m, st->tokens[b], m->x + b * d);
  pool_barrier(nth);
  for (int64_t l = 0; l < c->n_layer; l++) {
    const GebLayer *L = &m->layers[l];
    prep_all(st, &L->wqkv, m->x, d, L->attn_norm, tid, nth);
    pool_barrier(nth);
    GebAct a = act_of(st, m->xf, m->ldf);
    matmul_part(st, &L->wqkv, &a, m->qkv, qkv_ld, 0, tid, nth);
    pool_barrier(nth);
    attention_part(st, l, tid, nth);
    pool_barrier(nth);
    prep_all(st, &L->wo, m->y, qd, NULL, tid, nth);
    pool_barrier(nth);
    a = act_of(st, m->y, qd);
    matmul_part(st, &L->wo, &a, m->x, d, 1, tid, nth);
    pool_barrier(nth);
    prep_all(st, &L->wgu, m->x, d, L->ffn_norm, tid, nth);
    pool_barrier(nth);
    a = act_of(st, m->xf, m->ldf);
    swiglu_part(st, &L->wgu, &a, tid, nth);
    pool_barrier(nth);
    prep_all(st, &L->wdown, m->h, c->ffn_hidden, NULL, tid, nth);
    pool_barrier(nth);
    a = act_of(st, m->h, c->ffn_hidden);
    matmul_part(st, &L->wdown, &a, m->x, d, 1, tid, nth);
    pool_barrier(nth);
  }
  prep_all(st, &m->head, m->x, d, m->norm, tid, nth);
  pool_barrier(nth);
  GebAct a = act_of(st, m->xf, m->ldf);
  matmul_part(st, &m->head, &a, st->logits, c->vocab, 0, tid, nth);
}

/* One decode step for sequences 0..b-1: tokens[b] goes at position pos[b] of slot b's cache;
 * logits [b, vocab]. Returns 0, or a negative code for bad arguments (checked before any work). */
int geb_decode(GebModel *m, int64_t b, const int64_t *tokens, const int64_t *pos, float *logits) {
  const GebConfig *c = &m->c;
  if (!m->x || b < 1 || b > m->slots) return -1;
  for (int64_t i = 0; i < b; i++) {
    if (tokens[i] < 0 || tokens[i] >= c->vocab) return -2;
    if (pos[i] < 0 || pos[i] >= m->max_len || pos[i] >= m->rope_len) return -3;
  }
  const int nth = geb_get_threads();
  const int64_t grp = c->n_head / c->n_kv_head;
  const int64_t each = round_up(grp * m->max_len > 2 * m->slots * GU_CHUNK ? grp * m->max_len : 2 * m->slots * GU_CHUNK, 16);
  if (m->tscr_threads < nth || m->tscr_each < each) {
    free(m->tscr);
    m->tscr = malloc(sizeof(float) * each * nth);
    if (!m->tscr) {
      m->tscr_threads = 0;
      return -4;
    }
    m->tscr_each = each;
    m->tscr_threads = nth;
  }
  Step st = {m, kernels(), b, tokens, pos, logits};
  pool_run(step_task, &st);
  return 0;
}

/* ---- single products (tests, prefill's weight widening) ------------------------------------------ */
typedef struct {
  const GebMat *w;
  const GebKernels *k;
  GebModel *m;
  const float *x;
  int64_t rows;
  float *y;
  int64_t r0, r1;
  float *out;
} MatJob;

static void matmul_task(void *arg, int tid, int nth) {
  MatJob *j = arg;
  Step st = {j->m, j->k, j->rows, NULL, NULL, NULL};
  for (int64_t b = tid; b < j->rows; b += nth) prep_row(&st, j->w, j->x, j->w->k, b);
  pool_barrier(nth);
  GebAct a = act_of(&st, j->x, j->w->k);
  int64_t r0, r1;
  split(j->w->n, tid, nth, &r0, &r1);
  if (r1 > r0) j->k->mm(j->w, &a, (int)j->rows, j->y, j->w->n, 0, r0, r1);
}

/* y [rows, n] = x [rows, k] W^T through the decode kernels (rows <= 64), on the pool. */
int geb_matmul(const GebMat *w, const float *x, int64_t rows, float *y) {
  if (rows < 1 || rows > 64) return -1;
  GebModel tmp;
  memset(&tmp, 0, sizeof tmp);
  const int64_t k = round_up(w->kp > w->k ? w->kp : w->k, 64);
  tmp.ldf = k;
  tmp.ldq = k;
  tmp.ldg = round_up(k / 32, 8) + 8;
  tmp.xb = malloc(sizeof(uint16_t) * rows * k);
  tmp.xq = malloc(rows * k);
  tmp.xd = calloc(rows * tmp.ldg, sizeof(float));
  tmp.xs = calloc(rows * tmp.ldg, sizeof(float));
  if (!tmp.xb || !tmp.xq || !tmp.xd || !tmp.xs) {
    free(tmp.xb); free(tmp.xq); free(tmp.xd); free(tmp.xs);
    return -4;
  }
  MatJob j = {w, kernels(), &tmp, x, rows, y, 0, 0, NULL};
  pool_run(matmul_task, &j);
  free(tmp.xb); free(tmp.xq); free(tmp.xd); free(tmp.xs);
  return 0;
}

static void dequant_task(void *arg, int tid, int nth) {
  MatJob *j = arg;
  int64_t a, b;
  split(j->r1 - j->r0, tid, nth, &a, &b);
  if (b > a) j->k->dequant(j->w, j->r0 + a, j->r0 + b, j->out + a * j->w->k);
}

/* out [r1 - r0, k] = rows r0..r1 of W as FP32, on the pool. */
int geb_dequant(const GebMat *w, int64_t r0, int64_t r1, float *out) {
  if (r0 < 0 || r1 > w->n || r1 < r0) return -1;
  MatJob j = {w, kernels(), NULL, NULL, 0, NULL, r0, r1, out};
  pool_run(dequant_task, &j);
  return 0;
}

/* MinHash signature values of one document's shingle hashes (geb/data/minhash.py), on the calling
 * thread: the data pipeline's parallelism is its worker processes */
int geb_minhash(const uint64_t *h, int64_t n, const uint64_t *a, const uint64_t *b, int64_t k, uint64_t mask,
                uint64_t *best) {
  if (n < 0 || k < 0) return -1;
  kernels()->minhash(h, n, a, b, k, mask, best);
  return 0;
}

/* one activation row's int8 groups, as the quantized products see them (tests) */
void geb_quant_q8(const float *x, int64_t k, int64_t kp, int8_t *q, float *d, float *sx) {
  kernels()->quant_q8(x, k, kp, q, d, sx);
}

/* ---- the Python module: importable, so the package finds this file; calls go through ctypes ------ */
static struct PyModuleDef moddef = {
    PyModuleDef_HEAD_INIT, .m_name = "_native",
    .m_doc = "geb's native CPU decode core (called through ctypes by geb.infer.native).", .m_size = -1};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&moddef); }
