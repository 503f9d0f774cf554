//! The paged KV cache on the CPU: one contiguous pool per layer of `token_slots` rows of
//! `values_per_token` values, stored as f32 or f16.

use crate::spec::{KvCacheLayout, KvDtype};
use half::f16;

pub enum KvData {
    F32(Vec<f32>),
    F16(Vec<f16>),
}

pub struct CpuKvCache {
    pub layout: KvCacheLayout,
    pub data: KvData,
}

impl CpuKvCache {
    pub fn new(layout: &KvCacheLayout) -> CpuKvCache {
        let len = layout.layers * layout.token_slots() * layout.values_per_token;
        let data = match layout.dtype {
            KvDtype::F32 => KvData::F32(vec![0.0; len]),
            KvDtype::F16 => KvData::F16(vec![f16::ZERO; len]),
        };
        CpuKvCache {
            layout: layout.clone(),
            data,
        }
    }

    /// Where a slot's row of `layer` starts in the data (in values).
    #[inline]
    pub fn offset(&self, layer: usize, slot: usize) -> usize {
        (layer * self.layout.token_slots() + slot) * self.layout.values_per_token
    }

    /// Store `values` (at most `values_per_token`) at the start of a slot's row.
    pub fn write_row(&mut self, layer: usize, slot: usize, start: usize, values: &[f32]) {
        let o = self.offset(layer, slot) + start;
        match &mut self.data {
            KvData::F32(d) => d[o..o + values.len()].copy_from_slice(values),
            KvData::F16(d) => {
                for (dst, &v) in d[o..o + values.len()].iter_mut().zip(values) {
                    *dst = f16::from_f32(v);
                }
            }
        }
    }

    /// Read `dst.len()` values of a slot's row starting at `start`, widened to f32.
    #[inline]
    pub fn read_row(&self, layer: usize, slot: usize, start: usize, dst: &mut [f32]) {
        let o = self.offset(layer, slot) + start;
        let end = o + dst.len();
        match &self.data {
            KvData::F32(d) => dst.copy_from_slice(&d[o..end]),
            KvData::F16(d) => super::simd::widen(&d[o..end], dst),
        }
    }

    /// `Σ_i q[i] · row[start + i]`.
    #[inline]
    pub fn dot_row(&self, layer: usize, slot: usize, start: usize, q: &[f32]) -> f32 {
        let o = self.offset(layer, slot) + start;
        match &self.data {
            KvData::F32(d) => super::simd::dot(&d[o..o + q.len()], q),
            KvData::F16(d) => super::simd::dot(&d[o..o + q.len()], q),
        }
    }

    /// `acc[i] += p · row[start + i]`.
    #[inline]
    pub fn axpy_row(&self, layer: usize, slot: usize, start: usize, p: f32, acc: &mut [f32]) {
        let o = self.offset(layer, slot) + start;
        let end = o + acc.len();
        match &self.data {
            KvData::F32(d) => super::simd::axpy(acc, p, &d[o..end]),
            KvData::F16(d) => super::simd::axpy(acc, p, &d[o..end]),
        }
    }
}
