/* mg_alloc.c: the abort-on-failure allocation family (see mg_alloc.h). */
#include "common/mg_alloc.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void oom(size_t n)
{
    fprintf(stderr, "meshgate: out of memory allocating %zu bytes\n", n);
    abort();
}

void *mg_xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p)
        oom(n);
    return p;
}

void *mg_xcalloc(size_t count, size_t n)
{
    void *p = calloc(count ? count : 1, n ? n : 1);
    if (!p)
        oom(count * n);
    return p;
}

void *mg_xrealloc(void *p, size_t n)
{
    void *q = realloc(p, n ? n : 1);
    if (!q)
        oom(n);
    return q;
}

char *mg_xstrdup(const char *s)
{
    return mg_xstrndup(s, strlen(s));
}

char *mg_xstrndup(const char *s, size_t n)
{
    char *d = mg_xmalloc(n + 1);
    memcpy(d, s, n);
    d[n] = '\0';
    return d;
}

void *mg_xmemdup(const void *p, size_t n)
{
    void *d = mg_xmalloc(n);
    if (n)
        memcpy(d, p, n);
    return d;
}

char *mg_xasprintf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char *s = NULL;
    int n = vasprintf(&s, fmt, ap);
    va_end(ap);
    if (n < 0)
        oom(0);
    return s;
}
