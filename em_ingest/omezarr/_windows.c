/* The streaming writer's window means in one pass over a block, without the GIL.
 *
 * mean_into(block, out, (fz, fy, fx)) -> (sum, min, max)
 *
 * Writes the mean of each fz x fy x fx window of `block` (factors 1 or 2, sides divisible by them) into `out`,
 * rounding half up exactly as pyramid.WindowMean does with numpy: the window's values are added in a wider
 * integer, then (sum + n/2) >> log2(n), an arithmetic shift for signed types. It returns the block's exact
 * sum, minimum and maximum, which numpy would take three more passes over the block for.
 *
 * numpy does the same work as a z pair sum, a y pair sum, a strided x pair sum, a shift and a cast, each a
 * pass over memory with an intermediate array; here each output row reads its input rows once, while they
 * are in cache. Both arrays are 3-D with contiguous rows (any outer strides: `out` is often a view into the
 * next level's block); uint8, int8, uint16 and int16, in native byte order. pyramid.py falls back to numpy
 * for anything else, and when this module was not built.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* The kernels, one set per voxel type T: ACC holds the sum of 8 voxels, WORD two voxels side by side, TOTAL
 * the block's sum. Each step is its own loop over one row, with `restrict` pointers, so that the compiler
 * vectorizes it. The x pairs are read as WORDs and split with a mask and a shift, where that is exact (a
 * little-endian machine, rows aligned to a WORD): gathering the even and the odd voxels of a row instead costs
 * shuffles that cut the vector speed in half. (setup.py compiles with -fno-strict-aliasing for the WORD reads.) */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define LITTLE_ENDIAN_MACHINE 1
#else
#define LITTLE_ENDIAN_MACHINE 0
#endif

#define KERNEL(SUFFIX, T, ACC, WORD, TOTAL)                                                                 \
    /* acc[x] = row[x] (first row) or acc[x] + row[x], for the window's x extent of 1 */                    \
    static void add_row_##SUFFIX(const T *restrict row, ACC *restrict acc, Py_ssize_t n, int first)         \
    {                                                                                                      \
        if (first)                                                                                         \
            for (Py_ssize_t x = 0; x < n; x++)                                                             \
                acc[x] = (ACC)row[x];                                                                      \
        else                                                                                               \
            for (Py_ssize_t x = 0; x < n; x++)                                                             \
                acc[x] = (ACC)(acc[x] + row[x]);                                                           \
    }                                                                                                      \
    /* acc[x] = row[2x] + row[2x + 1] (first row) or acc[x] plus that, for the window's x extent of 2 */   \
    static void add_pairs_##SUFFIX(const T *restrict row, ACC *restrict acc, Py_ssize_t n, int first,       \
                                   int as_words)                                                           \
    {                                                                                                      \
        const int bits = 8 * (int)sizeof(T);                                                               \
        if (as_words) {                                                                                    \
            const WORD *restrict words = (const WORD *)row;                                                \
            if (first)                                                                                     \
                for (Py_ssize_t x = 0; x < n; x++)                                                         \
                    acc[x] = (ACC)((ACC)(T)words[x] + (ACC)(T)(words[x] >> bits));                         \
            else                                                                                           \
                for (Py_ssize_t x = 0; x < n; x++)                                                         \
                    acc[x] = (ACC)(acc[x] + (ACC)(T)words[x] + (ACC)(T)(words[x] >> bits));                \
        } else {                                                                                           \
            for (Py_ssize_t x = 0; x < n; x++)                                                             \
                acc[x] = (ACC)((first ? 0 : acc[x]) + row[2 * x] + row[2 * x + 1]);                        \
        }                                                                                                  \
    }                                                                                                      \
    static void extremes_##SUFFIX(const T *restrict row, Py_ssize_t n, T *lo, T *hi)                       \
    {                                                                                                      \
        T l = *lo, h = *hi;                                                                                \
        for (Py_ssize_t x = 0; x < n; x++) {                                                               \
            l = row[x] < l ? row[x] : l;                                                                   \
            h = row[x] > h ? row[x] : h;                                                                   \
        }                                                                                                  \
        *lo = l;                                                                                           \
        *hi = h;                                                                                           \
    }                                                                                                      \
    /* dest[x] = (acc[x] + half) >> shift; returns the row's sum */                                        \
    static TOTAL finish_row_##SUFFIX(const ACC *restrict acc, T *restrict dest, Py_ssize_t n, int shift)    \
    {                                                                                                      \
        const ACC half = (ACC)((1 << shift) >> 1);                                                         \
        TOTAL total = 0;                                                                                   \
        for (Py_ssize_t x = 0; x < n; x++) {                                                               \
            total += acc[x];                                                                               \
            dest[x] = (T)((ACC)(acc[x] + half) >> shift);                                                  \
        }                                                                                                  \
        return total;                                                                                      \
    }                                                                                                      \
    static void mean_##SUFFIX(const char *in, const Py_ssize_t *oshape, const Py_ssize_t *istride,          \
                              char *out, const Py_ssize_t *ostride, const int *f, void *scratch,           \
                              TOTAL *total_out, T *lo_out, T *hi_out)                                      \
    {                                                                                                      \
        const Py_ssize_t nx = oshape[2], width = nx * f[2];                                                \
        const int shift = (f[0] == 2) + (f[1] == 2) + (f[2] == 2);                                        \
        const int as_words = LITTLE_ENDIAN_MACHINE && (uintptr_t)in % sizeof(WORD) == 0 &&                 \
                             istride[0] % (Py_ssize_t)sizeof(WORD) == 0 &&                                 \
                             istride[1] % (Py_ssize_t)sizeof(WORD) == 0;                                   \
        ACC *acc = scratch;                                                                                \
        TOTAL total = 0;                                                                                   \
        T lo = *(const T *)in, hi = lo;                                                                    \
        for (Py_ssize_t oz = 0; oz < oshape[0]; oz++) {                                                    \
            for (Py_ssize_t oy = 0; oy < oshape[1]; oy++) {                                                \
                int first = 1;                                                                             \
                for (int dz = 0; dz < f[0]; dz++) {                                                        \
                    for (int dy = 0; dy < f[1]; dy++) {                                                    \
                        const T *row = (const T *)(in + (oz * f[0] + dz) * istride[0] +                   \
                                                   (oy * f[1] + dy) * istride[1]);                        \
                        if (f[2] == 2)                                                                     \
                            add_pairs_##SUFFIX(row, acc, nx, first, as_words);                             \
                        else                                                                               \
                            add_row_##SUFFIX(row, acc, nx, first);                                         \
                        extremes_##SUFFIX(row, width, &lo, &hi);                                           \
                        first = 0;                                                                         \
                    }                                                                                      \
                }                                                                                          \
                T *dest = (T *)(out + oz * ostride[0] + oy * ostride[1]);                                  \
                total += finish_row_##SUFFIX(acc, dest, nx, shift);                                        \
            }                                                                                              \
        }                                                                                                  \
        *total_out = total;                                                                                \
        *lo_out = lo;                                                                                      \
        *hi_out = hi;                                                                                      \
    }

/* Sums of 8 values: uint8 fits uint16, int8 int16, uint16 uint32, int16 int32 (numpy's accumulators too). */
KERNEL(u8, uint8_t, uint16_t, uint16_t, uint64_t)
KERNEL(i8, int8_t, int16_t, uint16_t, int64_t)
KERNEL(u16, uint16_t, uint32_t, uint32_t, uint64_t)
KERNEL(i16, int16_t, int32_t, uint32_t, int64_t)

static int native_format(const char *format, char *code)
{
    /* numpy describes native arrays as "B", or with an explicit native marker ("=B", "@B"). */
    if (format[0] == '@' || format[0] == '=')
        format++;
    if (format[0] == 0 || format[1] != 0 || strchr("BbHh", format[0]) == NULL)
        return 0;
    *code = format[0];
    return 1;
}

static PyObject *mean_into(PyObject *self, PyObject *args)
{
    PyObject *source, *target;
    int f[3];
    if (!PyArg_ParseTuple(args, "OO(iii)", &source, &target, &f[0], &f[1], &f[2]))
        return NULL;
    Py_buffer in, out;
    if (PyObject_GetBuffer(source, &in, PyBUF_STRIDES | PyBUF_FORMAT) < 0)
        return NULL;
    if (PyObject_GetBuffer(target, &out, PyBUF_STRIDES | PyBUF_FORMAT | PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&in);
        return NULL;
    }
    PyObject *result = NULL;
    char code = 0, out_code = 0;
    if (in.ndim != 3 || out.ndim != 3 || !native_format(in.format, &code) ||
        !native_format(out.format, &out_code) || code != out_code) {
        PyErr_SetString(PyExc_ValueError, "mean_into: block and out must be 3-D arrays of one native "
                                          "8- or 16-bit integer type");
        goto done;
    }
    for (int i = 0; i < 3; i++) {
        if ((f[i] != 1 && f[i] != 2) || in.shape[i] != out.shape[i] * f[i] || in.shape[i] == 0) {
            PyErr_Format(PyExc_ValueError, "mean_into: axis %d: %zd voxels do not make %zd windows of %d",
                         i, in.shape[i], out.shape[i], f[i]);
            goto done;
        }
    }
    if (in.strides[2] != in.itemsize || out.strides[2] != out.itemsize) {
        PyErr_SetString(PyExc_ValueError, "mean_into: rows must be contiguous");
        goto done;
    }
    /* One output row of window sums, in the widest accumulator (uint32 / int32 for 16-bit voxels). */
    void *rowsum = malloc((size_t)out.shape[2] * sizeof(uint32_t));
    if (rowsum == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    uint64_t utotal = 0;
    int64_t itotal = 0;
    long lo = 0, hi = 0;
    Py_BEGIN_ALLOW_THREADS
    switch (code) {
    case 'B': {
        uint8_t l, h;
        mean_u8(in.buf, out.shape, in.strides, out.buf, out.strides, f, rowsum, &utotal, &l, &h);
        lo = l, hi = h;
        break;
    }
    case 'b': {
        int8_t l, h;
        mean_i8(in.buf, out.shape, in.strides, out.buf, out.strides, f, rowsum, &itotal, &l, &h);
        lo = l, hi = h;
        break;
    }
    case 'H': {
        uint16_t l, h;
        mean_u16(in.buf, out.shape, in.strides, out.buf, out.strides, f, rowsum, &utotal, &l, &h);
        lo = l, hi = h;
        break;
    }
    default: {
        int16_t l, h;
        mean_i16(in.buf, out.shape, in.strides, out.buf, out.strides, f, rowsum, &itotal, &l, &h);
        lo = l, hi = h;
        break;
    }
    }
    Py_END_ALLOW_THREADS
    free(rowsum);
    if (code == 'B' || code == 'H')
        result = Py_BuildValue("(Kll)", (unsigned long long)utotal, lo, hi);
    else
        result = Py_BuildValue("(Lll)", (long long)itotal, lo, hi);
done:
    PyBuffer_Release(&out);
    PyBuffer_Release(&in);
    return result;
}

static PyMethodDef methods[] = {
    {"mean_into", mean_into, METH_VARARGS,
     "mean_into(block, out, factors) -> (sum, min, max): window means of block written into out."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_windows", NULL, -1, methods};

PyMODINIT_FUNC PyInit__windows(void) { return PyModule_Create(&module); }
