/* Exercises the C ABI the way a C user would: load, forward, reset, errors. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "yinsen.h"

#define CHECK(cond, ...) do { if (!(cond)) { fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
    fprintf(stderr, __VA_ARGS__); fprintf(stderr, "\n"); return 1; } } while (0)

int main(void) {
    /* Failed loads return NULL with a message, and NULL handles are errors. */
    YinsenModel *bad = yinsen_load("/nonexistent/model.gguf");
    CHECK(bad == NULL, "loading a missing file succeeded");
    CHECK(strlen(yinsen_last_error()) > 0, "no error message after failed load");
    CHECK(yinsen_load(NULL) == NULL, "NULL path accepted");
    float dummy[4];
    int32_t one = 1;
    CHECK(yinsen_forward(bad, &one, 1, dummy) < 0, "forward on NULL model succeeded");
    CHECK(yinsen_n_vocab(NULL) < 0, "n_vocab on NULL succeeded");
    yinsen_reset(NULL);
    yinsen_free(NULL);

    YinsenModel *m = yinsen_load("synthetic:tiny");
    CHECK(m != NULL, "load synthetic:tiny: %s", yinsen_last_error());
    int32_t nv = yinsen_n_vocab(m);
    CHECK(nv == 2048, "n_vocab %d", nv);
    float *a = malloc(sizeof(float) * nv), *b = malloc(sizeof(float) * nv);
    for (int i = 0; i < nv; i++) a[i] = b[i] = NAN; /* poison */

    int32_t toks[5] = {11, 22, 33, 44, 55};
    CHECK(yinsen_forward(m, toks, 5, a) == 0, "forward: %s", yinsen_last_error());
    for (int i = 0; i < nv; i++) CHECK(isfinite(a[i]), "logit %d not written", i);

    /* Same sequence token by token after a reset gives the same logits. */
    yinsen_reset(m);
    for (int i = 0; i < 5; i++) CHECK(yinsen_forward(m, &toks[i], 1, b) == 0, "step %d: %s", i, yinsen_last_error());
    float maxd = 0;
    for (int i = 0; i < nv; i++) { float d = fabsf(a[i] - b[i]); if (d > maxd) maxd = d; }
    CHECK(maxd < 1e-4f, "prefill vs decode differ by %g", maxd);

    /* Bad arguments are errors, never crashes. */
    CHECK(yinsen_forward(m, toks, 0, a) < 0, "n = 0 accepted");
    CHECK(yinsen_forward(m, toks, -3, a) < 0, "n < 0 accepted");
    int32_t big = 1 << 20, neg = -1;
    CHECK(yinsen_forward(m, &big, 1, a) < 0, "out-of-range id accepted");
    CHECK(strstr(yinsen_last_error(), "out of range") != NULL, "message: %s", yinsen_last_error());
    CHECK(yinsen_forward(m, &neg, 1, a) < 0, "negative id accepted");
    CHECK(yinsen_forward(m, NULL, 1, a) < 0, "NULL tokens accepted");
    CHECK(yinsen_forward(m, toks, 1, NULL) < 0, "NULL logits accepted");

    yinsen_free(m);
    free(a); free(b);
    printf("c abi ok\n");
    return 0;
}
