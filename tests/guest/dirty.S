# Page-dirtying pattern: for each of cx 16-bit page numbers (< 256) in the table at ds:si,
# write the byte cl (the remaining count) at the start of that page, then halt.
# In: cx = number of pages, si = table address (ds = 0).
    .code16
    .globl _start
_start:
1:  lodsw
    shl  $8, %ax
    mov  %ax, %es
    mov  %cl, %es:0
    loop 1b
2:  hlt
    jmp  2b
