//! Tensor access: `.dim(i)`, `.load`, `.load_or`, `.store`, `.atomic_add`, and the outer-product
//! indexing that turns `[i0, i1]` into a pointer tile and a bounds mask.

use super::*;

impl Lower<'_> {
    pub(super) fn tensor_method(
        &mut self,
        t: &TensorB,
        m: &syn::ExprMethodCall,
    ) -> R<Option<ValueId>> {
        let name = m.method.to_string();
        let args: Vec<&Expr> = m.args.iter().collect();
        match name.as_str() {
            "dim" => {
                self.nargs(m, args.len(), 1, "dim")?;
                let d = self.static_int(args[0])?;
                let v = t.dims.get(d).copied().ok_or_else(|| {
                    Error::new_spanned(args[0], format!("`{}` has {} dimensions", t.name, t.dims.len()))
                })?;
                Ok(Some(v))
            }
            "load" | "load_or" => {
                self.nargs(m, args.len(), if name == "load" { 1 } else { 2 }, &name)?;
                let (ptr, mask) = self.address(t, args[0])?;
                let other = if name == "load_or" { Some(self.expr(args[1])?) } else { None };
                Ok(Some(ir(self.b.load(ptr, Some(mask), other), m)?))
            }
            "store" | "atomic_add" => {
                self.nargs(m, args.len(), 2, &name)?;
                if !t.mutable {
                    return Err(Error::new_spanned(
                        &m.receiver,
                        format!("`{}` is read-only: declare it `TensorMut` to {name} into it", t.name),
                    ));
                }
                let (ptr, mask) = self.address(t, args[0])?;
                let v = self.expr(args[1])?;
                let r = if name == "store" { self.b.store(ptr, v, Some(mask)) } else { self.b.atomic_add(ptr, v, Some(mask)) };
                ir(r, m)?;
                Ok(None)
            }
            _ => Err(Error::new_spanned(
                &m.method,
                format!("unknown tensor method `.{name}()`: tensors have `.dim(i)`, `.load`, `.load_or`, `.store`, `.atomic_add`"),
            )),
        }
    }

    /// Pointer tile and bounds mask of `tensor[indices]` with outer-product indexing: each index
    /// is a scalar or a 1-D tile, and the result has one dimension per 1-D index, in order.
    pub(super) fn address(&mut self, t: &TensorB, idx: &Expr) -> R<(ValueId, ValueId)> {
        let Expr::Array(a) = strip_paren(idx) else {
            return Err(Error::new_spanned(
                idx,
                "index a tensor with `[i0, i1, ..]`, one index per dimension",
            ));
        };
        if a.elems.len() != t.dims.len() {
            return Err(Error::new_spanned(
                a,
                format!(
                    "`{}` has {} dimension(s) but {} index(es) were given",
                    t.name,
                    t.dims.len(),
                    a.elems.len()
                ),
            ));
        }
        let mut vals = vec![];
        for e in &a.elems {
            let v = self.expr(e)?;
            let ty = self.b.ty(v).clone();
            if ty.rank() > 1 || !matches!(ty.dtype, DType::I32 | DType::I64) {
                return Err(Error::new_spanned(
                    e,
                    format!("an index must be a scalar or 1-D integer tile, found {ty}"),
                ));
            }
            vals.push((v, e));
        }
        let tiles = vals
            .iter()
            .filter(|(v, _)| self.b.ty(*v).rank() == 1)
            .count();
        if tiles > 2 {
            return Err(Error::new_spanned(a, "at most two indices may be tiles"));
        }
        let mut k = 0;
        let mut off: Option<ValueId> = None;
        let mut mask: Option<ValueId> = None;
        let last = t.dims.len() - 1;
        for (d, (v, e)) in vals.iter().enumerate() {
            let mut v = *v;
            if self.b.ty(v).rank() == 1 {
                if tiles == 2 {
                    v = ir(self.b.expand_dims(v, 1 - k), *e)?;
                }
                k += 1;
            }
            let v64 = ir(self.b.cast(v, DType::I64), *e)?;
            let inb = ir(self.b.cmp(CmpPred::Lt, v64, t.dims[d]), *e)?;
            mask = Some(match mask {
                None => inb,
                Some(m) => ir(self.b.binary(BinOp::And, m, inb), *e)?,
            });
            let term = if d == last {
                v64
            } else {
                ir(self.b.binary(BinOp::Mul, v64, t.strides[d]), *e)?
            };
            off = Some(match off {
                None => term,
                Some(o) => ir(self.b.binary(BinOp::Add, o, term), *e)?,
            });
        }
        let (Some(off), Some(mask)) = (off, mask) else {
            return Err(Error::new_spanned(a, "empty index"));
        };
        let ptr = ir(self.b.addptr(t.ptr, off), a)?;
        Ok((ptr, mask))
    }
}
