//! A bounds-checked safe wrapper over `matrixmultiply::sgemm`, the one unsafe call in the node.
//!
//! `matrixmultiply` is the maintained pure-Rust GEMM behind ndarray; its entry point takes
//! raw pointers and strides. [`sgemm`] checks that every element the strides can reach lies
//! inside the slices before calling it.

/// A row-major or strided view of an `rows × cols` matrix inside a slice.
#[derive(Debug, Clone, Copy)]
pub struct Mat<'a> {
    /// The backing elements.
    pub data: &'a [f32],
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Step between rows.
    pub rs: usize,
    /// Step between columns.
    pub cs: usize,
}

impl<'a> Mat<'a> {
    /// A dense row-major `rows × cols` matrix.
    pub fn rows(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Mat {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose of a dense row-major `rows × cols` matrix, as a `cols × rows` view.
    pub fn transposed(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Mat {
            data,
            rows: cols,
            cols: rows,
            rs: 1,
            cs: cols,
        }
    }

    fn fits(&self) -> bool {
        if self.rows == 0 || self.cols == 0 {
            return true;
        }
        (self.rows - 1)
            .checked_mul(self.rs)
            .zip((self.cols - 1).checked_mul(self.cs))
            .and_then(|(a, b)| a.checked_add(b))
            .is_some_and(|last| last < self.data.len())
    }
}

/// `c = alpha · a · b + beta · c`, with `c` dense row-major `a.rows × b.cols`.
///
/// # Panics
/// When the shapes disagree or a view reaches outside its slice: a programming error in the
/// caller, never a data-dependent condition.
pub fn sgemm(alpha: f32, a: Mat<'_>, b: Mat<'_>, beta: f32, c: &mut [f32]) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "inner dimensions differ");
    assert!(a.fits() && b.fits(), "matrix view out of bounds");
    assert_eq!(c.len(), m * n, "output has the wrong size");
    if m == 0 || n == 0 {
        return;
    }
    #[allow(unsafe_code)]
    // SAFETY: `fits` proved every index i*rs + j*cs of `a` and `b` is in bounds, and `c` has
    // exactly m*n elements addressed with row stride n and column stride 1. The slices do not
    // alias: `c` is borrowed mutably while `a` and `b` are shared borrows.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            alpha,
            a.data.as_ptr(),
            a.rs as isize,
            a.cs as isize,
            b.data.as_ptr(),
            b.rs as isize,
            b.cs as isize,
            beta,
            c.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multiplies_plain_and_transposed() {
        // a = [[1,2,3],[4,5,6]] (2x3), b = [[1,0],[0,1],[1,1]] (3x2)
        let a = [1., 2., 3., 4., 5., 6.];
        let b = [1., 0., 0., 1., 1., 1.];
        let mut c = [0.0; 4];
        sgemm(1.0, Mat::rows(&a, 2, 3), Mat::rows(&b, 3, 2), 0.0, &mut c);
        assert_eq!(c, [4., 5., 10., 11.]);
        // aᵀ·a is 3x3.
        let mut c = [1.0; 9];
        sgemm(
            1.0,
            Mat::transposed(&a, 2, 3),
            Mat::rows(&a, 2, 3),
            1.0,
            &mut c,
        );
        assert_eq!(c, [18., 23., 28., 23., 30., 37., 28., 37., 46.]);
    }

    #[test]
    #[should_panic(expected = "out of bounds")]
    fn refuses_views_outside_the_slice() {
        let a = [1.0; 5];
        let mut c = [0.0; 4];
        sgemm(1.0, Mat::rows(&a, 2, 3), Mat::rows(&a, 3, 2), 0.0, &mut c);
    }
}
